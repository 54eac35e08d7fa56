"""Benchmark: synthetic ~2 GB MindSpore Transformers checkpoint (fp32, mcore naming, interleaved
layouts, header {"format": "ms"}) -> Megatron-Core TP2xPP2 in bf16 through convert.py --loader core_mf.

    python bench/bench_mindspore.py [--size-gb 2] [--workdir /tmp/bench_ms] [--keep]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_args, measure_conversion  # noqa: E402

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


def main() -> None:
    args = bench_args(__doc__, 2.0, "/tmp/bench_ms")
    layers = make_model(args.workdir / "ms", args.size_gb)
    measure_conversion(args, args.workdir / "ms", [
        "--loader", "core_mf", "--saver", "core_ext", "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
        "--saver-transformer-impl", "local", "--num-attention-heads", str(HEADS)],
        f"model: {layers} layers, hidden {HIDDEN}, fp32 MindSpore -> bf16 mcore TP2xPP2", 1.5e9)

if __name__ == "__main__":
    main()
