"""Benchmark: synthetic ~2 GB MindSpore Transformers checkpoint (fp32, mcore naming, interleaved
layouts, header {"format": "ms"}) -> Megatron-Core TP2xPP2 in bf16 through convert.py --loader core_mf.

    python bench/bench_mindspore.py [--size-gb 2] [--workdir /tmp/bench_ms] [--keep] [--training-output]

--training-output: the same weights as a training run leaves them, Checkpoint 1.0 of 8 ranks (2 pipeline
stages x DP2 x TP2 with optimizer parallel, so every byte is stored once) with per-rank strategy files.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_args, measure_conversion  # noqa: E402

from ckpt_lib.engine.ms_distributed import Layout  # noqa: E402
from ckpt_lib.io.safetensors_io import write_file  # noqa: E402

HIDDEN, FFN, HEADS, GROUPS, VOCAB = 2048, 5632, 16, 4, 32000


def make_model(directory: Path, size_gb: float) -> int:
    """One safetensors file per layer; returns the layer count."""
    dim = HIDDEN // HEADS
    per_layer = 4 * (HIDDEN * (HEADS + 2 * GROUPS) * dim + HIDDEN * HIDDEN + 3 * HIDDEN * FFN)
    layers = max(2, 2 * round((size_gb * 1e9 - 8 * VOCAB * HIDDEN) / per_layer / 2))
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(shape).normal_(0, 0.02, generator=gen)

    for i in range(layers):
        p = f"decoder.layers.{i}."
        tensors = {p + "input_layernorm.weight": torch.ones(HIDDEN), p + "pre_mlp_layernorm.weight": torch.ones(HIDDEN),
                   p + "self_attention.linear_qkv.weight": rnd((HEADS + 2 * GROUPS) * dim, HIDDEN),
                   p + "self_attention.linear_proj.weight": rnd(HIDDEN, HIDDEN),
                   p + "mlp.linear_fc1.weight": rnd(2 * FFN, HIDDEN), p + "mlp.linear_fc2.weight": rnd(HIDDEN, FFN)}
        if i == 0:
            tensors.update({"embedding.word_embeddings.weight": rnd(VOCAB, HIDDEN), "output_layer.weight": rnd(VOCAB, HIDDEN),
                            "decoder.final_layernorm.weight": torch.ones(HIDDEN)})
        write_file(directory / f"layer-{i:03d}.safetensors", tensors, {"format": "ms"})
    return layers


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _strategy(layouts: dict[str, tuple[list[int], int]], stage: int) -> bytes:
    """A ParallelStrategyMap (mindspore/train/node_strategy.proto) for one stage: dev_matrix [dp=2, tp=2]."""
    op = _field(1, b"Default/MatMul-op0") + _field(2, _field(1, stage) + _field(2, _field(1, 1) + _field(1, 2)))
    out = _field(1, stage) + _field(2, op)
    for name, (tensor_map, opt) in layouts.items():
        layout = (_field(1, _field(1, 2) + _field(1, 2)) + _field(2, b"".join(_field(1, m) for m in tensor_map))
                  + _field(3, b"") + _field(4, b"") + _field(5, 0) + _field(6, 2 if opt else 0) + _field(7, opt))
        out += _field(3, _field(1, name.encode()) + _field(2, layout))
    return out


def make_training_output(merged: Path, out: Path, layers: int) -> None:
    """The merged model cut into 8 ranks (PP2 x DP2 x TP2, optimizer parallel): rank = 4 * stage + 2 * dp + tp."""
    from ckpt_lib.io.safetensors_io import SafetensorsSource

    source = SafetensorsSource(sorted(merged.glob("*.safetensors")))
    column = ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
    row = ("linear_proj.weight", "linear_fc2.weight")
    for stage in (0, 1):
        names = [n for n in source.names() if (int(n.split(".")[2]) < layers // 2 if n.startswith("decoder.layers.")
                                                else n.startswith("embedding.")) == (stage == 0)]
        layouts = {n: ([0, -1] if n.endswith(column) else [-1, 0] if n.endswith(row) else [-1], 2) for n in names}
        ranks: dict[int, dict[str, torch.Tensor]] = {4 * stage + r: {} for r in range(4)}
        for n in names:
            tensor = source.get(n)
            tmap = layouts[n][0]
            layout = Layout((2, 2), tuple(() if m == -1 else (m,) for m in tmap), 2, stage)
            for r in ranks:
                start, shape = layout.slice_of(r, tuple(tensor.shape))
                piece = tensor
                for d, (s, k) in enumerate(zip(start, shape)):
                    piece = piece.narrow(d, s, k)
                ranks[r][n] = piece.contiguous()
        for r, tensors in ranks.items():
            (out / "checkpoint" / f"rank_{r}").mkdir(parents=True)
            write_file(out / "checkpoint" / f"rank_{r}" / f"bench_rank_{r}-1_1.safetensors", tensors, {"format": "ms"})
            (out / "strategy").mkdir(exist_ok=True)
            (out / "strategy" / f"ckpt_strategy_rank_{r}.ckpt").write_bytes(_strategy(layouts, stage))
    shutil.rmtree(merged)


def main() -> None:
    training = "--training-output" in sys.argv
    if training:
        sys.argv.remove("--training-output")
    args = bench_args(__doc__, 2.0, "/tmp/bench_ms")
    layers = make_model(args.workdir / "ms", args.size_gb)
    if training:
        make_training_output(args.workdir / "ms", args.workdir / "run", layers)
    measure_conversion(args, args.workdir / ("run" if training else "ms"), [
        "--loader", "core_mf", "--saver", "core_ext", "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
        "--saver-transformer-impl", "local", "--num-attention-heads", str(HEADS)],
        f"model: {layers} layers, hidden {HIDDEN}, fp32 MindSpore{' training output (8 ranks)' if training else ''} -> "
        "bf16 mcore TP2xPP2", 1.5e9)

if __name__ == "__main__":
    main()
