"""Benchmark: synthetic DeepSeek-V3-shaped HF checkpoint (MLA, MoE, MTP; fewer layers and experts,
real structure) -> Megatron-Core TP2xEP2xPP2 through convert.py; with --fp8 the input is in DeepSeek's
FP8 release layout (e4m3 linear weights with block-128 `_scale_inv`), dequantized to bf16 while streaming.

Prints wall time, bytes, peak RSS of the process tree, the largest pipeline stage and the raw
I/O floor measured in the same run.

    python bench/bench_deepseek.py [--size-gb 3] [--fp8] [--workdir /tmp/bench_deepseek] [--keep]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_args, measure_conversion  # noqa: E402

from ckpt_lib.io import fp8  # noqa: E402
from ckpt_lib.io.safetensors_io import write_file  # noqa: E402

BLOCK = (128, 128)

SHAPE = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_attention_heads=8, q_lora_rank=384,
             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
             n_shared_experts=1, vocab_size=32000)


def layer_tensors(i: int, moe: bool, rnd) -> dict[str, torch.Tensor]:
    s = SHAPE
    h, heads = s["hidden_size"], s["num_attention_heads"]
    p = f"model.layers.{i}."
    t = {
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "self_attn.q_a_proj.weight": rnd(s["q_lora_rank"], h),
        p + "self_attn.q_a_layernorm.weight": torch.ones(s["q_lora_rank"], dtype=torch.bfloat16),
        p + "self_attn.q_b_proj.weight": rnd(heads * (s["qk_nope_head_dim"] + s["qk_rope_head_dim"]), s["q_lora_rank"]),
        p + "self_attn.kv_a_proj_with_mqa.weight": rnd(s["kv_lora_rank"] + s["qk_rope_head_dim"], h),
        p + "self_attn.kv_a_layernorm.weight": torch.ones(s["kv_lora_rank"], dtype=torch.bfloat16),
        p + "self_attn.kv_b_proj.weight": rnd(heads * (s["qk_nope_head_dim"] + s["v_head_dim"]), s["kv_lora_rank"]),
        p + "self_attn.o_proj.weight": rnd(h, heads * s["v_head_dim"]),
    }
    if not moe:
        f = s["intermediate_size"]
        t.update({p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h), p + "mlp.down_proj.weight": rnd(h, f)})
        return t
    f, e = s["moe_intermediate_size"], s["n_routed_experts"]
    t.update({p + "mlp.gate.weight": rnd(e, h), p + "mlp.gate.e_score_correction_bias": torch.zeros(e, dtype=torch.float32),
              p + "mlp.shared_experts.gate_proj.weight": rnd(f, h), p + "mlp.shared_experts.up_proj.weight": rnd(f, h),
              p + "mlp.shared_experts.down_proj.weight": rnd(h, f)})
    for x in range(e):
        q = f"{p}mlp.experts.{x}."
        t.update({q + "gate_proj.weight": rnd(f, h), q + "up_proj.weight": rnd(f, h), q + "down_proj.weight": rnd(h, f)})
    return t


def quantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's FP8 layout: each weight it quantizes as e4m3 with its block scales."""
    out = {}
    for name, t in tensors.items():
        if fp8.RELEASE_QUANTIZED.fullmatch(name):
            out[name], out[name + fp8.SCALE_SUFFIX] = fp8.quantize(t, BLOCK)
        else:
            out[name] = t
    return out


def make_model(directory: Path, size_gb: float, as_fp8: bool = False) -> dict:
    s = SHAPE
    h, f, e = s["hidden_size"], s["moe_intermediate_size"], s["n_routed_experts"]
    moe_bytes = (1 if as_fp8 else 2) * 3 * (e + 1) * f * h
    layers = max(4, 2 * round((size_gb * 1e9 - 4 * s["vocab_size"] * h) / moe_bytes / 2) - 2)  # + 1 MTP layer
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **s, "num_hidden_layers": layers,
           "num_key_value_heads": s["num_attention_heads"], "first_k_dense_replace": 1, "num_experts_per_tok": 8,
           "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "dtype": "bfloat16"}
    if as_fp8:
        cfg["quantization_config"] = fp8.quantization_config(BLOCK)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)

    weight_map: dict[str, str] = {}
    embed, head = rnd(s["vocab_size"], h), rnd(s["vocab_size"], h)
    for i in range(layers + 1):
        tensors = layer_tensors(i, i >= 1, rnd)
        if i == 0:
            tensors.update({"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                            "lm_head.weight": head})
        if i == layers:  # MTP layer, official layout
            p = f"model.layers.{i}."
            tensors.update({p + "enorm.weight": torch.ones(h, dtype=torch.bfloat16), p + "hnorm.weight": torch.ones(h, dtype=torch.bfloat16),
                            p + "eh_proj.weight": rnd(h, 2 * h), p + "shared_head.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                            p + "embed_tokens.weight": embed, p + "shared_head.head.weight": head})
        name = f"model-{i:05d}.safetensors"
        tensors = quantized(tensors) if as_fp8 else tensors
        write_file(directory / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return cfg


def main() -> None:
    args = bench_args(__doc__, 3.0, "/tmp/bench_deepseek", fp8=True)
    cfg = make_model(args.workdir / "hf", args.size_gb, args.fp8)
    measure_conversion(args, args.workdir / "hf", [
        "--loader", "hf_deepseek3", "--saver", "core_ext", "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
        "--target-expert-parallel-size", "2", "--mtp-num-layers", "1", "--saver-transformer-impl", "local"],
        f"model: {cfg['num_hidden_layers']} layers + MTP, {cfg['n_routed_experts']} experts, {'FP8 (block 128)' if args.fp8 else 'bf16'}, "
        "HF -> bf16 mcore TP2xEP2xPP2", 1.5e9)

if __name__ == "__main__":
    main()
