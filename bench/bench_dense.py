"""Benchmark: synthetic dense Llama-shaped HF checkpoint -> Megatron-Core TP2xPP2 through convert.py.

Prints wall time, bytes read and written, throughput, peak RSS of the whole process tree (loader,
saver, queue feeder), the size of the largest pipeline stage, and the machine's raw I/O floor
(reading the input and writing as many bytes with plain file I/O) measured in the same run.

    python bench/bench_dense.py [--size-gb 2] [--workdir /tmp/bench_dense] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from ckpt_lib.safetensors_io import write_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dir_bytes, print_memory, raw_floor, run_measured  # noqa: E402


def make_model(directory: Path, size_gb: float) -> dict:
    """Write a Llama-shaped bf16 checkpoint of about `size_gb` GB in 1 GB shards, with random values."""
    hidden, ffn, heads, groups, vocab = 2048, 5632, 16, 4, 32000
    dim = hidden // heads
    per_layer = 2 * (hidden * hidden * 2 + 2 * groups * dim * hidden + 3 * hidden * ffn + 2 * hidden)
    layers = max(4, round((size_gb * 1e9 - 2 * 2 * vocab * hidden) / per_layer / 4) * 4)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn,
           "num_attention_heads": heads, "num_key_value_heads": groups, "num_hidden_layers": layers, "vocab_size": vocab,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "dtype": "bfloat16"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)

    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    shards = 0

    def flush() -> None:
        nonlocal shard, shards
        name = f"model-{shards:05d}.safetensors"
        write_file(directory / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
        shards += 1
        shard = {}

    shard["model.embed_tokens.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shard.update({
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(groups * dim, hidden),
            p + "self_attn.v_proj.weight": rnd(groups * dim, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, ffn),
        })
        if sum(t.nbytes for t in shard.values()) > 1e9:
            flush()
    shard["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    shard["lm_head.weight"] = rnd(vocab, hidden)
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_dense"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    src, out = args.workdir / "hf", args.workdir / "mcore"
    shutil.rmtree(args.workdir, ignore_errors=True)
    cfg = make_model(src, args.size_gb)
    in_bytes = dir_bytes(src)
    cmd = [sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", "--loader", "hf", "--saver", "core_ext",
           "--load-dir", str(src), "--save-dir", str(out), "--target-tensor-parallel-size", "2",
           "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local"]
    wall, peak, _ = run_measured(cmd)
    out_bytes = dir_bytes(out)
    stage_bytes = max(sum(f.stat().st_size for f in out.rglob(f"mp_rank_*_{pp:03d}/*.pt")) for pp in range(2))
    floor = raw_floor(src, out_bytes, args.workdir / "floor.bin")
    print(f"model: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, bf16, HF -> mcore TP2xPP2")
    print(f"input bytes      {in_bytes / 1e9:8.3f} GB")
    print(f"output bytes     {out_bytes / 1e9:8.3f} GB")
    print(f"wall time        {wall:8.2f} s   ({in_bytes / wall / 1e9:.2f} GB/s of input)")
    print(f"raw I/O floor    {floor:8.2f} s   (read input + write output, same run, warm cache)")
    print_memory(peak, stage_bytes, 1e9)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
