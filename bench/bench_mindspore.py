"""Benchmark: synthetic ~2 GB MindSpore Transformers checkpoint (fp32, mcore naming, interleaved
layouts, header {"format": "ms"}) -> Megatron-Core TP2xPP2 in bf16 through convert.py --loader core_mf.

    python bench/bench_mindspore.py [--size-gb 2] [--workdir /tmp/bench_ms] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import dir_bytes, print_memory, raw_floor, run_measured  # noqa: E402

from ckpt_lib.safetensors_io import write_file  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ms"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    src, out = args.workdir / "ms", args.workdir / "mcore"
    shutil.rmtree(args.workdir, ignore_errors=True)
    layers = make_model(src, args.size_gb)
    in_bytes = dir_bytes(src)
    cmd = [sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", "--loader", "core_mf", "--saver", "core_ext",
           "--load-dir", str(src), "--save-dir", str(out), "--target-tensor-parallel-size", "2",
           "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local", "--num-attention-heads", str(HEADS)]
    wall, peak, _ = run_measured(cmd)
    out_bytes = dir_bytes(out)
    stage_bytes = max(sum(f.stat().st_size for f in out.rglob(f"mp_rank_*_{pp:03d}/*.pt")) for pp in range(2))
    floor = raw_floor(src, out_bytes, args.workdir / "floor.bin")
    print(f"model: {layers} layers, hidden {HIDDEN}, fp32 MindSpore -> bf16 mcore TP2xPP2")
    print(f"input bytes      {in_bytes / 1e9:8.3f} GB")
    print(f"output bytes     {out_bytes / 1e9:8.3f} GB")
    print(f"wall time        {wall:8.2f} s   ({in_bytes / wall / 1e9:.2f} GB/s of input)")
    print(f"raw I/O floor    {floor:8.2f} s   (read input + write output, same run, warm cache)")
    print_memory(peak, stage_bytes, 1.5e9)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
