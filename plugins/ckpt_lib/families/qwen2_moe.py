"""Qwen2-MoE in HuggingFace naming (GQA with qkv bias, softmax top-k router, routed experts and one shared
expert behind a sigmoid gate) <-> protocol.

The shared expert is `mlp.shared_expert.{gate,up,down}_proj` (singular) and its gate
`mlp.shared_expert_gate.weight` [1, H]: HF adds `sigmoid(x @ gate.T) * shared_expert(x)` to the routed
output, which is megatron-core's `moe_shared_expert_gate` (`mlp.shared_experts.gate_weight` [1, H]).
Routed experts and dense layers are Qwen3-MoE's (per expert or fused on disk, `mlp_only_layers` /
`decoder_sparse_step`); transformers' default router does not renormalise (`norm_topk_prob` false).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from ..transport.spec import ModelSpec
from . import MoeTables, Relation, Section, deepseek, dense, qwen3_moe

MODEL_TYPE, ARCHITECTURE, EXPERT_SIZE = "qwen2_moe", "Qwen2MoeForCausalLM", "moe_intermediate_size"

SHARED_EXPERT = (
    Relation(("mlp.shared_expert.gate_proj.weight",), (P.SHARED_FC1_GATE_W,)),
    Relation(("mlp.shared_expert.up_proj.weight",), (P.SHARED_FC1_UP_W,)),
    Relation(("mlp.shared_expert.down_proj.weight",), (P.SHARED_FC2_W,)),
    Relation(("mlp.shared_expert_gate.weight",), (P.SHARED_GATE_W,)),
)
LAYER = Section(None, dense.LAYER.prefix, qwen3_moe.LAYER.relations + SHARED_EXPERT)
TABLES = MoeTables(LAYER, dense.LAYER, deepseek.EXPERTS)
FUSED_TABLES = MoeTables(LAYER, dense.LAYER, qwen3_moe.FUSED_EXPERTS)
EXPERTS = TABLES.experts  # written per expert, as transformers 5 saves


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype) -> ModelSpec:
    """The model spec of a Qwen2-MoE config.json: Qwen3-MoE's router rules on Qwen2 attention (`qkv_bias`,
    which transformers 5 writes and older configs leave to its default, true), plus the gated shared expert."""
    if cfg.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window true is not supported (megatron-core GPT attends to all tokens)")
    windowed = [i for i, kind in enumerate(cfg.get("layer_types") or ()) if kind != "full_attention"]
    if windowed:
        raise ConversionError(f"config.json: layer_types makes layers {windowed} sliding-window attention, which megatron-core "
                              "GPT does not have")
    shared = cfg.get("shared_expert_intermediate_size")
    if not shared or shared < 1:
        raise ConversionError(f"config.json: shared_expert_intermediate_size {shared}: Qwen2-MoE needs its shared expert (>= 1)")
    md = qwen3_moe.moe_metadata(cfg, params_dtype, MODEL_TYPE, "qwen2", EXPERT_SIZE, bool(cfg.get("norm_topk_prob", False)))
    assert md.moe is not None
    return dataclasses.replace(md, qkv_bias=bool(cfg.get("qkv_bias", True)), moe=dataclasses.replace(
        md.moe, shared_expert_intermediate_size=shared, shared_expert_gate=True))


def holds(md: ModelSpec) -> bool:
    """The checkpoint's flags are Qwen2-MoE's: a shared expert with a sigmoid gate, no q/k norm."""
    return (md.moe is not None and not md.qk_layernorm and bool(md.moe.shared_expert_intermediate_size)
            and md.moe.shared_expert_gate and qwen3_moe.plain_softmax_router(md.moe))


def check(md: ModelSpec) -> None:
    """What a qwen2_moe config.json cannot say about a checkpoint."""
    if not holds(md):
        raise ConversionError(f"the checkpoint ({qwen3_moe.flags(md)}) is not a Qwen2-MoE (a shared expert with a sigmoid gate, "
                              "softmax router, no q/k norm)")


def hf_tables(md: ModelSpec, has: Callable[[str], bool]) -> MoeTables:
    """Per-expert (transformers 5's `save_pretrained`) or fused routed experts, decided by the first MoE layer."""
    assert md.moe is not None
    return FUSED_TABLES if has(f"model.layers.{md.moe.first_k_dense_replace}.mlp.experts.gate_up_proj") else TABLES


def layer_section(md: ModelSpec, layer: int) -> Section:
    return TABLES.layer_section(md, layer)


def check_config(cfg: dict[str, Any], md: ModelSpec) -> None:
    """The output config.json's family, experts, router, shared expert and qkv bias must be the checkpoint's."""
    qwen3_moe.check_moe_config(cfg, md, MODEL_TYPE, EXPERT_SIZE)
    moe = md.moe
    assert moe is not None
    pre = bool(moe.router_pre_softmax)
    if bool(cfg.get("norm_topk_prob", False)) == pre:
        raise ConversionError(f"config.json norm_topk_prob={cfg.get('norm_topk_prob', False)} disagrees with the checkpoint's "
                              f"moe_router_pre_softmax={pre}")
    for key, got, want in (("shared_expert_intermediate_size", cfg.get("shared_expert_intermediate_size"),
                            moe.shared_expert_intermediate_size), ("qkv_bias", cfg.get("qkv_bias", True), md.qkv_bias)):
        if got != want:
            raise ConversionError(f"config.json {key}={got} disagrees with the checkpoint's {want}")


def hf_config_from_metadata(md: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """A Qwen2-MoE config.json from the checkpoint's flags alone (a checkpoint with no recorded config)."""
    moe = md.moe
    assert moe is not None
    cfg = dense.hf_config_from_metadata(md, vocab_size)
    cfg.pop("attention_bias", None)
    cfg.update({
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "qkv_bias": bool(md.qkv_bias),
        "num_experts": moe.num_experts, "num_experts_per_tok": moe.router_topk, EXPERT_SIZE: moe.ffn_hidden_size,
        "shared_expert_intermediate_size": moe.shared_expert_intermediate_size,
        "norm_topk_prob": not moe.router_pre_softmax, "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(moe.first_k_dense_replace)), "use_sliding_window": False,
    })
    return cfg
