"""Dense GPT families in HuggingFace naming (Llama, Mistral, Qwen2, Qwen3) <-> protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from ..transport.spec import ModelSpec
from . import QKV, Relation, Section

EMBEDDING = Section(P.EMBEDDINGS, "model.", (Relation(("embed_tokens.weight",), (P.WORD_EMB,)),))
LAYER = Section(
    None,
    "model.layers.{layer}.",
    (
        Relation(("input_layernorm.weight",), (P.INPUT_NORM_W,)),
        Relation(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), (P.QKV_W,), QKV),
        Relation(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), (P.QKV_B,), QKV, when="qkv_bias"),
        Relation(("self_attn.q_norm.weight",), (P.Q_NORM_W,), when="qk_layernorm"),
        Relation(("self_attn.k_norm.weight",), (P.K_NORM_W,), when="qk_layernorm"),
        Relation(("self_attn.o_proj.weight",), (P.DENSE_W,)),
        Relation(("post_attention_layernorm.weight",), (P.POST_NORM_W,)),
        Relation(("mlp.gate_proj.weight",), (P.FC1_GATE_W,)),
        Relation(("mlp.up_proj.weight",), (P.FC1_UP_W,)),
        Relation(("mlp.down_proj.weight",), (P.FC2_W,)),
    ),
)
FINAL_NORM = Section(P.FINAL_NORM, "model.", (Relation(("norm.weight",), ("weight",)),))
OUTPUT = Section(P.OUTPUT_LAYER, "", (Relation(("lm_head.weight",), ("weight",)),), when="output_layer")


@dataclass(frozen=True)
class Variant:
    """What distinguishes one HF dense family from another."""

    architecture: str
    qkv_bias: bool | None  # None: read `attention_bias` from the config
    qk_layernorm: bool


VARIANTS = {
    "llama": Variant("LlamaForCausalLM", None, False),
    "mistral": Variant("MistralForCausalLM", False, False),
    "qwen2": Variant("Qwen2ForCausalLM", True, False),
    "qwen3": Variant("Qwen3ForCausalLM", None, True),
}


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype, model_type_hf: str | None = None) -> ModelSpec:
    """The model spec of an HF dense config; refuses what Megatron's dense GPT cannot express."""
    family = model_type_hf or cfg.get("model_type")
    if family not in VARIANTS:
        raise ConversionError(f"config.json: model_type {family!r} is not a supported dense family ({', '.join(VARIANTS)})")
    variant = VARIANTS[family]
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only silu/SwiGLU)")
    if cfg.get("mlp_bias"):
        raise ConversionError("config.json: mlp_bias=true has no Megatron-Core dense equivalent")
    rope_type = (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ConversionError(f"config.json: rope_type {rope_type!r} is not supported yet (only default RoPE)")
    heads = cfg["num_attention_heads"]
    qkv_bias = variant.qkv_bias if variant.qkv_bias is not None else bool(cfg.get("attention_bias", False))
    if family == "llama" and qkv_bias:
        raise ConversionError("config.json: llama attention_bias=true (o_proj bias) is not supported")
    return ModelSpec(
        model_type="GPT",
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        seq_length=cfg.get("max_position_embeddings", 4096),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tokenizer_type="HuggingFaceTokenizer",
        iteration=1,
        params_dtype=params_dtype,
        bert_binary_head=False,
        output_layer=not cfg.get("tie_word_embeddings", False),
        position_embedding_type="rope",
        linear_bias=False,
        qkv_bias=qkv_bias,
        norm_has_bias=False,
        swiglu=True,
        true_vocab_size=cfg["vocab_size"],
        vocab_size=cfg["vocab_size"],
        make_vocab_size_divisible_by=128,
        previous_tensor_parallel_size=1,
        previous_pipeline_parallel_size=1,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        normalization="RMSNorm",
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        rotary_base=_rope_theta(cfg),
        qk_layernorm=variant.qk_layernorm,
        hf_config=dict(cfg),
    )


def hf_config_from_metadata(md: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """Rebuild an HF config.json when no source config is available."""
    if md.qk_layernorm:
        family = "qwen3"
    elif md.qkv_bias:
        family = "qwen2"
    else:
        family = "llama"
    if not md.swiglu or md.linear_bias or md.norm_has_bias or md.position_embedding_type != "rope":
        raise ConversionError("this model is not a dense Llama/Qwen-style GPT (needs SwiGLU, RMSNorm, RoPE, no linear bias)")
    cfg: dict[str, Any] = {
        "architectures": [VARIANTS[family].architecture],
        "model_type": family,
        "hidden_size": md.hidden_size,
        "intermediate_size": md.ffn_hidden_size,
        "num_hidden_layers": md.num_layers,
        "num_attention_heads": md.num_attention_heads,
        "num_key_value_heads": md.num_query_groups,
        "head_dim": md.kv_channels,
        "vocab_size": vocab_size,
        "max_position_embeddings": md.max_position_embeddings,
        "rms_norm_eps": md.norm_epsilon,
        "rope_theta": md.rotary_base,
        "hidden_act": "silu",
        "tie_word_embeddings": not md.output_layer,
        "dtype": str(md.params_dtype).removeprefix("torch."),
    }
    if family == "llama":
        cfg["attention_bias"] = False
    return cfg


SECTIONS = (EMBEDDING, LAYER, FINAL_NORM, OUTPUT)
