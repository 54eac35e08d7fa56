"""DeepSeek-V2 / V2-Lite (transformers' DeepseekV2ForCausalLM) <-> protocol metadata.

The tensors are DeepSeek-V3's (`deepseek` tables: MLA, first-k dense layers, shared experts; V2-Lite has
`q_lora_rank` null, a plain `q_proj`) without the router's expert bias and without MTP. The router is
another: softmax over all experts, the top k taken as they are (never renormalised: transformers ignores
`norm_topk_prob`), times `routed_scaling_factor`, which is megatron-core's softmax router with
`moe_router_pre_softmax` and `moe_router_topk_scaling_factor`. `topk_method` group_limited_greedy first keeps
the `topk_group` groups with the best single score; megatron-core ranks a group by the sum of its best
topk // topk_group scores, the same only when that is 1 (the released DeepSeek-V2 236B, 6 of 3 groups, is refused).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConversionError
from ..transport.spec import ModelSpec
from . import rope_scaling
from .deepseek import check_groups, mla_metadata

TOPK_METHODS = ("greedy", "group_limited_greedy")


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype) -> ModelSpec:
    """The model spec of a DeepSeek-V2 config.json; refuses what megatron-core cannot express, naming the field."""
    if cfg.get("scoring_func", "softmax") != "softmax":
        raise ConversionError(f"config.json scoring_func {cfg['scoring_func']!r}: the DeepSeek-V2 class scores experts with "
                              "softmax whatever the config says")
    if cfg.get("norm_topk_prob"):
        raise ConversionError("config.json norm_topk_prob true: transformers' DeepSeek-V2 ignores it (top-k weights are not "
                              "renormalised) while DeepSeek's own code renormalises; refusing the ambiguous config")
    method = cfg.get("topk_method", "greedy")
    if method not in TOPK_METHODS:
        raise ConversionError(f"config.json topk_method {method!r}: the DeepSeek-V2 class routes with {' or '.join(TOPK_METHODS)}")
    if (cfg.get("num_nextn_predict_layers") or 0) > 0:
        raise ConversionError("config.json num_nextn_predict_layers: the DeepSeek-V2 class has no MTP layer")
    md = mla_metadata(cfg, params_dtype, 0, "DeepSeek-V2")
    assert md.moe is not None
    groups = group_topk = None  # transformers ignores n_group / topk_group for greedy
    if method == "group_limited_greedy":
        check_groups(cfg, md.moe.router_topk, per_group_best=1, ranking="its best score")
        groups, group_topk = cfg["n_group"], cfg["topk_group"]
    return dataclasses.replace(md, moe=dataclasses.replace(
        md.moe, router_num_groups=groups, router_group_topk=group_topk, router_score_function="softmax",
        router_pre_softmax=True, router_topk_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
        router_enable_expert_bias=False))


def hf_config_from_metadata(md: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """A DeepSeek-V2 config.json rebuilt from the spec of a softmax-routed MLA checkpoint (no recorded or given config)."""
    mla, moe = md.mla, md.moe
    assert mla is not None and moe is not None
    if not moe.router_pre_softmax or moe.router_enable_expert_bias:
        raise ConversionError("a softmax-routed MLA checkpoint is written as DeepSeek-V2, whose router takes the softmax over "
                              "all experts (moe_router_pre_softmax) and has no expert bias; this one differs")
    groups = moe.router_num_groups
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": vocab_size,
        "hidden_size": md.hidden_size, "intermediate_size": md.ffn_hidden_size, "moe_intermediate_size": moe.ffn_hidden_size,
        "num_hidden_layers": md.num_layers, "num_attention_heads": md.num_attention_heads,
        "num_key_value_heads": md.num_attention_heads, "n_shared_experts": moe.shared_expert_intermediate_size // moe.ffn_hidden_size,
        "n_routed_experts": moe.num_experts, "routed_scaling_factor": moe.router_topk_scaling_factor or 1.0,
        "kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank, "qk_rope_head_dim": mla.qk_pos_emb_head_dim,
        "qk_nope_head_dim": mla.qk_head_dim, "v_head_dim": mla.v_head_dim, "num_experts_per_tok": moe.router_topk,
        "topk_method": "group_limited_greedy" if groups else "greedy", "n_group": groups, "topk_group": moe.router_group_topk,
        "first_k_dense_replace": moe.first_k_dense_replace, "norm_topk_prob": False, "scoring_func": "softmax",
        "hidden_act": "silu", "max_position_embeddings": md.max_position_embeddings, "rms_norm_eps": md.norm_epsilon,
        "rope_theta": md.rotary_base, "rope_scaling": rope_scaling.to_hf(md.rope_scaling),
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }
