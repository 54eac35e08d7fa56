"""GLM-4.5 / GLM-4.5-Air (transformers `Glm4MoeForCausalLM`, model_type glm4_moe) in HuggingFace naming <-> protocol.

Attention is dense GQA (`dense.LAYER`'s q/k/v, with `attention_bias` on q/k/v only, and per-head q/k
RMSNorm when `use_qk_norm`), rotary embedding on the first `partial_rotary_factor` of each head's
dimensions (not interleaved: transformers' `rotate_half`, megatron-core's `rotary_interleaved=False`).
The MoE block is DeepSeek-V3's (`deepseek.MOE`: sigmoid router with `e_score_correction_bias`, shared
experts; per-expert names as transformers saves them, or the fused [E, ...] layout of its memory).
MTP layers follow the last decoder layer as in DeepSeek-V3's release (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, copies of the embedding and head); transformers neither builds nor saves them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from ..transport.spec import ModelSpec, MoESpec
from . import Section, deepseek, dense

MODEL_TYPE = "glm4_moe"
ATTENTION = tuple(r for r in dense.LAYER.relations if not r.source[0].startswith("mlp."))
MOE_LAYER = Section(None, dense.LAYER.prefix, ATTENTION + deepseek.MOE)
DENSE_LAYER = dense.LAYER
MTP_LAYER = Section(None, dense.LAYER.prefix, deepseek.MTP_EXTRA + ATTENTION + deepseek.MOE)
MTP_COPIES = deepseek.MTP_COPIES
EXPERTS = deepseek.EXPERTS  # written per expert, as transformers 5 saves

# transformers 5.23's Glm4MoeConfig defaults, for keys a config.json may leave out (save_pretrained writes
# them all; hand-written configs and older releases may not). `partial_rotary_factor` 0.5 is its default too.
DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "attention_bias": False, "use_qk_norm": False,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
    "moe_intermediate_size": 1408,
}
PARTIAL_ROTARY_DEFAULT = 0.5


def partial_rotary_factor(cfg: dict[str, Any]) -> float:
    """transformers' rule: `rope_parameters.partial_rotary_factor`, else the top-level key (GLM-4.5's
    released config.json), else 0.5."""
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", PARTIAL_ROTARY_DEFAULT)))


def check_router(topk: int, experts: int, groups: int, group_topk: int, norm_topk_prob: bool) -> tuple[int | None, int | None]:
    """megatron-core's sigmoid routing matches transformers' only in these cases; returns megatron's
    (moe_router_num_groups, moe_router_group_topk), None where no group limit applies.

    transformers ranks groups by the sum of their top-2 biased scores; megatron-core by the sum of their top
    `topk // group_topk`: the same when that is 2, or when every group is kept (then no ranking happens).
    megatron-core divides the chosen sigmoid scores by their sum for top-k > 1 and never for top-1, which is
    `norm_topk_prob` true for top-k > 1 and false for top-1."""
    if not 1 <= topk <= experts:
        raise ConversionError(f"config.json: num_experts_per_tok {topk} is not in 1..n_routed_experts {experts}")
    if norm_topk_prob != (topk > 1):
        what = "top-1 renormalised (every weight 1)" if topk == 1 else "top-k weights not renormalised"
        raise ConversionError(f"config.json: norm_topk_prob {str(norm_topk_prob).lower()} with num_experts_per_tok {topk} "
                              f"({what}) has no megatron-core equivalent")
    if groups < 1 or experts % groups:
        raise ConversionError(f"config.json: n_group {groups} does not divide n_routed_experts {experts}")
    if not 1 <= group_topk <= groups:
        raise ConversionError(f"config.json: topk_group {group_topk} is not in 1..n_group {groups}")
    if group_topk == groups:
        return None, None
    if topk // group_topk != 2:
        raise ConversionError(f"config.json: n_group {groups} / topk_group {group_topk} with num_experts_per_tok {topk}: "
                              "transformers ranks groups by their top-2 scores, megatron-core by their top "
                              f"num_experts_per_tok // topk_group = {topk // group_topk}; only a ratio of 2 converts")
    return groups, group_topk


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype, mtp_num_layers: int) -> ModelSpec:
    """The model spec of a glm4_moe config.json (`mtp_num_layers` of its MTP layers converted);
    refuses what megatron-core cannot express, naming the field."""
    full = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    rope = full.get("rope_parameters") or full.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"config.json: rope_type {rope.get('rope_type', rope.get('type'))!r} is not supported (only default RoPE)")
    shared, experts = full["n_shared_experts"], full["n_routed_experts"]
    if shared < 1:
        raise ConversionError(f"config.json: n_shared_experts {shared}: GLM-4.5 has at least one shared expert")
    first_k = full["first_k_dense_replace"]
    if not 0 <= first_k < full["num_hidden_layers"]:
        raise ConversionError(f"config.json: first_k_dense_replace {first_k} leaves no MoE layer among "
                              f"{full['num_hidden_layers']} layers")
    groups, group_topk = check_router(full["num_experts_per_tok"], experts, full["n_group"], full["topk_group"],
                                      bool(full["norm_topk_prob"]))
    rotary = partial_rotary_factor(full)
    if not 0 < rotary <= 1:
        raise ConversionError(f"config.json: partial_rotary_factor {rotary} is not in (0, 1]")
    md = dense.metadata_from_hf(full, params_dtype, "qwen3")  # qwen3: q/k/v bias read from attention_bias
    return dataclasses.replace(
        md, hf_config=dict(cfg), hf_model_type=MODEL_TYPE, qk_layernorm=bool(full["use_qk_norm"]), rotary_percent=rotary,
        mtp_num_layers=mtp_num_layers,
        moe=MoESpec(num_experts=experts, ffn_hidden_size=full["moe_intermediate_size"], first_k_dense_replace=first_k,
                    router_topk=full["num_experts_per_tok"], shared_expert_intermediate_size=shared * full["moe_intermediate_size"],
                    router_num_groups=groups, router_group_topk=group_topk,
                    router_topk_scaling_factor=float(full["routed_scaling_factor"]), router_score_function="sigmoid",
                    router_pre_softmax=False, router_enable_expert_bias=True))


def is_glm4_moe(md: ModelSpec) -> bool:
    """The family recorded by the loader, else the source config's model_type, else megatron-core's settings:
    sigmoid routing with an expert bias and no MLA (a Qwen3-MoE has neither)."""
    recorded = md.hf_model_type or (md.hf_config or {}).get("model_type")
    if recorded is not None:
        return recorded == MODEL_TYPE
    return (md.moe is not None and md.mla is None
            and md.moe.router_score_function == "sigmoid" and md.moe.router_enable_expert_bias)


def check(md: ModelSpec) -> None:
    """What a glm4_moe config.json cannot say about a checkpoint."""
    moe = md.moe
    assert moe is not None
    if not moe.shared_expert_intermediate_size or moe.shared_expert_intermediate_size % moe.ffn_hidden_size:
        raise ConversionError(f"moe_shared_expert_intermediate_size {moe.shared_expert_intermediate_size} is not a multiple "
                              f"of moe_ffn_hidden_size {moe.ffn_hidden_size} (GLM-4.5's n_shared_experts)")
    if moe.router_score_function != "sigmoid" or not moe.router_enable_expert_bias:
        raise ConversionError("GLM-4.5 routes with sigmoid scores and an expert bias; this checkpoint has "
                              f"moe_router_score_function {moe.router_score_function}, "
                              f"moe_router_enable_expert_bias {moe.router_enable_expert_bias}")
    if md.linear_bias or md.norm_has_bias or not md.swiglu or md.position_embedding_type != "rope":
        raise ConversionError("GLM-4.5 needs SwiGLU, RMSNorm, RoPE and no linear bias besides q/k/v")


def hf_config_from_metadata(md: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """A glm4_moe config.json rebuilt from the spec (a checkpoint without a recorded HF config)."""
    moe = md.moe
    assert moe is not None
    topk, groups = moe.router_topk, moe.router_num_groups
    return {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": vocab_size,
        "hidden_size": md.hidden_size, "intermediate_size": md.ffn_hidden_size, "moe_intermediate_size": moe.ffn_hidden_size,
        "num_hidden_layers": md.num_layers, "num_attention_heads": md.num_attention_heads,
        "num_key_value_heads": md.num_query_groups, "head_dim": md.kv_channels, "attention_bias": bool(md.qkv_bias),
        "use_qk_norm": bool(md.qk_layernorm), "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.shared_expert_intermediate_size // moe.ffn_hidden_size,
        "num_experts_per_tok": topk, "norm_topk_prob": topk > 1,
        "n_group": groups or 1, "topk_group": moe.router_group_topk if groups else 1,
        "routed_scaling_factor": moe.router_topk_scaling_factor or 1.0, "first_k_dense_replace": moe.first_k_dense_replace,
        "hidden_act": "silu", "max_position_embeddings": md.max_position_embeddings, "rms_norm_eps": md.norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": md.rotary_base, "partial_rotary_factor": md.rotary_percent},
        "tie_word_embeddings": not md.output_layer, "num_nextn_predict_layers": md.mtp_num_layers,
    }


def check_config(cfg: dict[str, Any], md: ModelSpec) -> None:
    """The output config.json must describe the checkpoint's attention and router, which the generic
    checks (layer and head counts) do not cover."""
    full = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    moe = md.moe
    assert moe is not None
    if cfg.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"config.json model_type {cfg.get('model_type')!r} is not {MODEL_TYPE} (the checkpoint is GLM-4.5)")
    groups, group_topk = check_router(full["num_experts_per_tok"], full["n_routed_experts"], full["n_group"],
                                      full["topk_group"], bool(full["norm_topk_prob"]))
    pairs = (
        ("partial_rotary_factor", partial_rotary_factor(full), "rotary_percent", md.rotary_percent),
        ("attention_bias", bool(full["attention_bias"]), "add_qkv_bias", bool(md.qkv_bias)),
        ("use_qk_norm", bool(full["use_qk_norm"]), "qk_layernorm", bool(md.qk_layernorm)),
        ("n_routed_experts", full["n_routed_experts"], "num_experts", moe.num_experts),
        ("moe_intermediate_size", full["moe_intermediate_size"], "moe_ffn_hidden_size", moe.ffn_hidden_size),
        ("n_shared_experts x moe_intermediate_size", full["n_shared_experts"] * full["moe_intermediate_size"],
         "moe_shared_expert_intermediate_size", moe.shared_expert_intermediate_size),
        ("num_experts_per_tok", full["num_experts_per_tok"], "moe_router_topk", moe.router_topk),
        ("n_group / topk_group", (groups, group_topk), "moe_router_num_groups / group_topk",
         (moe.router_num_groups, moe.router_group_topk) if moe.router_group_topk else (None, None)),
        ("routed_scaling_factor", float(full["routed_scaling_factor"]), "moe_router_topk_scaling_factor",
         float(moe.router_topk_scaling_factor or 1.0)),
        ("first_k_dense_replace", full["first_k_dense_replace"], "first_k_dense_replace", moe.first_k_dense_replace),
    )
    for hf_key, hf_value, md_key, md_value in pairs:
        if hf_value != md_value:
            raise ConversionError(f"config.json {hf_key}={hf_value} disagrees with the checkpoint's {md_key}={md_value}")
    # transformers saves a model without its MTP layers under a config that still names them: the config's
    # count stays unless the checkpoint holds MTP layers.
    if md.mtp_num_layers:
        cfg["num_nextn_predict_layers"] = md.mtp_num_layers


def layer_section(md: ModelSpec, layer: int) -> Section:
    return MOE_LAYER if P.is_moe_layer(md, layer) else DENSE_LAYER
