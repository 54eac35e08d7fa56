"""DeepSeek-V3 in HuggingFace naming (MLA, MoE with shared expert and expert bias, MTP) <-> protocol.

The MTP layer is stored by the official checkpoint as layer `num_hidden_layers`, with copies of
the embedding (`embed_tokens`) and output head (`shared_head.head`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from . import Relation, Section, rope_scaling
from .dense import EMBEDDING, FINAL_NORM, OUTPUT

LAYER_PREFIX = "model.layers.{layer}."
ATTENTION = (
    Relation(("input_layernorm.weight",), (P.INPUT_NORM_W,)),
    Relation(("self_attn.q_a_proj.weight",), (P.Q_DOWN_W,)),
    Relation(("self_attn.q_a_layernorm.weight",), (P.Q_DOWN_NORM_W,)),
    Relation(("self_attn.q_b_proj.weight",), (P.Q_UP_W,)),
    Relation(("self_attn.kv_a_proj_with_mqa.weight",), (P.KV_DOWN_W,)),
    Relation(("self_attn.kv_a_layernorm.weight",), (P.KV_DOWN_NORM_W,)),
    Relation(("self_attn.kv_b_proj.weight",), (P.KV_UP_W,)),
    Relation(("self_attn.o_proj.weight",), (P.DENSE_W,)),
    Relation(("post_attention_layernorm.weight",), (P.POST_NORM_W,)),
)
DENSE_MLP = (
    Relation(("mlp.gate_proj.weight",), (P.FC1_GATE_W,)),
    Relation(("mlp.up_proj.weight",), (P.FC1_UP_W,)),
    Relation(("mlp.down_proj.weight",), (P.FC2_W,)),
)
MOE = (
    Relation(("mlp.gate.weight",), (P.ROUTER_W,)),
    Relation(("mlp.gate.e_score_correction_bias",), (P.ROUTER_BIAS,)),
    Relation(("mlp.shared_experts.gate_proj.weight",), (P.SHARED_FC1_GATE_W,)),
    Relation(("mlp.shared_experts.up_proj.weight",), (P.SHARED_FC1_UP_W,)),
    Relation(("mlp.shared_experts.down_proj.weight",), (P.SHARED_FC2_W,)),
)
MTP_EXTRA = (
    Relation(("enorm.weight",), (P.MTP_ENORM_W,)),
    Relation(("hnorm.weight",), (P.MTP_HNORM_W,)),
    Relation(("eh_proj.weight",), (P.MTP_EH_PROJ_W,)),
    Relation(("shared_head.norm.weight",), (P.MTP_NORM_W,)),
)
# Copies the official MTP layer carries; checked equal to the main model's on the way in.
MTP_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}

DENSE_LAYER = Section(None, LAYER_PREFIX, ATTENTION + DENSE_MLP)
MOE_LAYER = Section(None, LAYER_PREFIX, ATTENTION + MOE)
EXPERTS = Section(None, LAYER_PREFIX, (
    Relation(("mlp.experts.{expert}.gate_proj.weight",), (P.FC1_GATE_W,)),
    Relation(("mlp.experts.{expert}.up_proj.weight",), (P.FC1_UP_W,)),
    Relation(("mlp.experts.{expert}.down_proj.weight",), (P.FC2_W,)),
))
MTP_LAYER = Section(None, LAYER_PREFIX, MTP_EXTRA + ATTENTION + MOE)
GLOBAL_SECTIONS = (EMBEDDING, FINAL_NORM, OUTPUT)


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype, mtp_num_layers: int) -> argparse.Namespace:
    """Protocol metadata for a DeepSeek-V3 config.json."""
    need = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "n_routed_experts", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "vocab_size")
    missing = [k for k in need if cfg.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)} (q_lora_rank must be set: DeepSeek-V3 layout)")
    if cfg.get("tie_word_embeddings", False):
        raise ConversionError("config.json: tied embeddings are not a DeepSeek-V3 layout")
    if cfg.get("first_k_dense_replace", 0) > 3:
        raise ConversionError(f"--first-k-dense-replace {cfg['first_k_dense_replace']}: at most 3 dense layers are supported (seeds)")
    heads = cfg["num_attention_heads"]
    shared = cfg.get("n_shared_experts") or 0
    md = P.make_metadata(
        model_type="GPT", num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads, num_query_groups=heads,
        kv_channels=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
        seq_length=cfg.get("max_position_embeddings", 4096), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tokenizer_type="HuggingFaceTokenizer", iteration=1, params_dtype=params_dtype, bert_binary_head=False,
        output_layer=True, position_embedding_type="rope", linear_bias=False, qkv_bias=False, norm_has_bias=False,
        swiglu=True, true_vocab_size=cfg["vocab_size"], vocab_size=cfg["vocab_size"], make_vocab_size_divisible_by=128,
        num_experts=cfg["n_routed_experts"], previous_tensor_parallel_size=1, previous_pipeline_parallel_size=1,
        consumed_train_samples=0, consumed_valid_samples=0, normalization="RMSNorm",
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6), rotary_base=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)),
        qk_layernorm=False, hf_config=dict(cfg),
    )
    md.multi_latent_attention = True
    md.rope_scaling = rope_scaling.from_hf(cfg, mla=True)
    md.q_lora_rank, md.kv_lora_rank = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    md.qk_head_dim, md.qk_pos_emb_head_dim, md.v_head_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    md.moe_ffn_hidden_size = cfg["moe_intermediate_size"]
    md.moe_shared_expert_intermediate_size = shared * cfg["moe_intermediate_size"] if shared else None
    md.first_k_dense_replace = cfg.get("first_k_dense_replace", 0)
    md.moe_router_topk = cfg.get("num_experts_per_tok")
    md.moe_router_num_groups = cfg.get("n_group")
    md.moe_router_group_topk = cfg.get("topk_group")
    md.moe_router_topk_scaling_factor = cfg.get("routed_scaling_factor")
    md.moe_router_score_function = cfg.get("scoring_func", "sigmoid")
    check_normalised_top_k(cfg, default=True)
    md.moe_router_enable_expert_bias = True
    md.mtp_num_layers = mtp_num_layers
    if not shared:
        raise ConversionError("config.json: n_shared_experts must be >= 1 for the DeepSeek-V3 layout")
    return md


def hf_config_from_metadata(md: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """A DeepSeek-V3 config.json rebuilt from the metadata (no recorded or given config), rope_scaling included."""
    shared = md.moe_shared_expert_intermediate_size or 0
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": vocab_size,
        "hidden_size": md.hidden_size, "intermediate_size": md.ffn_hidden_size, "moe_intermediate_size": md.moe_ffn_hidden_size,
        "num_hidden_layers": md.num_layers, "num_attention_heads": md.num_attention_heads,
        "num_key_value_heads": md.num_attention_heads, "n_shared_experts": shared // md.moe_ffn_hidden_size,
        "n_routed_experts": md.num_experts, "routed_scaling_factor": md.moe_router_topk_scaling_factor,
        "kv_lora_rank": md.kv_lora_rank, "q_lora_rank": md.q_lora_rank, "qk_rope_head_dim": md.qk_pos_emb_head_dim,
        "qk_nope_head_dim": md.qk_head_dim, "v_head_dim": md.v_head_dim, "n_group": md.moe_router_num_groups,
        "topk_group": md.moe_router_group_topk, "num_experts_per_tok": md.moe_router_topk,
        "first_k_dense_replace": md.first_k_dense_replace, "norm_topk_prob": True,
        "scoring_func": md.moe_router_score_function or "sigmoid", "hidden_act": "silu",
        "max_position_embeddings": md.max_position_embeddings, "rms_norm_eps": md.norm_epsilon, "rope_theta": md.rotary_base,
        "rope_scaling": rope_scaling.to_hf(getattr(md, "rope_scaling", None)), "rope_interleave": True,
        "attention_bias": False, "tie_word_embeddings": False, "num_nextn_predict_layers": getattr(md, "mtp_num_layers", 0) or 0,
    }


def check_normalised_top_k(cfg: dict[str, Any], default: bool) -> None:
    """Megatron-core renormalises the top-k routing weights (softmax after top-k; sigmoid scores divided
    by their sum), which is HF's `norm_topk_prob: true`; false would convert silently into other routing.
    `default` is transformers' default for the family when the key is absent."""
    if cfg.get("norm_topk_prob", default) is not True:
        raise ConversionError("config.json: norm_topk_prob false (top-k weights not renormalised) has no megatron-core "
                              "equivalent here; only norm_topk_prob true is converted")


def layer_section(md: argparse.Namespace, layer: int) -> Section:
    return MOE_LAYER if P.is_moe_layer(md, layer) else DENSE_LAYER
