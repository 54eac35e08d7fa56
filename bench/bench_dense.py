"""Benchmark: synthetic dense Llama-shaped HF checkpoint -> Megatron-Core TP2xPP2 through convert.py.

Prints wall time, bytes read and written, throughput, peak RSS of the whole process tree (loader,
saver, queue feeder), the size of the largest pipeline stage, and the machine's raw I/O floor
(reading the input and writing as many bytes with plain file I/O) measured in the same run.

    python bench/bench_dense.py [--size-gb 2] [--workdir /tmp/bench_dense] [--keep]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from ckpt_lib.io.safetensors_io import write_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_args, measure_conversion  # noqa: E402


def make_model(directory: Path, size_gb: float, hidden: int = 2048, ffn: int = 5632, heads: int = 16, groups: int = 4,
               vocab: int = 32000) -> dict:
    """Write a Llama-shaped bf16 checkpoint of about `size_gb` GB (at least 4 layers) in 1 GB shards, with random values."""
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
    args = bench_args(__doc__, 2.0, "/tmp/bench_dense")
    cfg = make_model(args.workdir / "hf", args.size_gb)
    measure_conversion(args, args.workdir / "hf", ["--loader", "hf", "--saver", "core_ext", "--target-tensor-parallel-size", "2",
                       "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local"],
                       f"model: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, bf16, HF -> mcore TP2xPP2", 1e9)

if __name__ == "__main__":
    main()
