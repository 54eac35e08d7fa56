"""The DeepSeek-V3 layout in HuggingFace naming (MLA, MoE with shared expert and expert bias, MTP) <-> protocol.

The MTP layer is stored by the official checkpoint as layer `num_hidden_layers`, with copies of
the embedding (`embed_tokens`) and output head (`shared_head.head`).

The configs that share the layout: DeepSeek-V3 / R1 / V3.1; Kimi-K2 (`model_type` kimi_k2, which
transformers 5.23 has no class for and every framework runs as DeepSeek-V3); Moonlight-16B-A3B
(`q_lora_rank` null: one plain `q_proj`, megatron-core's `linear_q_proj`); and DeepSeek-V2 / V2-Lite,
whose tensors are the same without the router's expert bias (its config translation: deepseek_v2.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from ..transport.spec import MLASpec, ModelSpec, MoESpec
from . import Relation, Section, rope_scaling
from .dense import EMBEDDING, FINAL_NORM, OUTPUT

V3_MODEL_TYPES = ("deepseek_v3", "kimi_k2")  # transformers' DeepseekV3ForCausalLM
V2_MODEL_TYPES = ("deepseek_v2",)  # transformers' DeepseekV2ForCausalLM (deepseek_v2.py)
# transformers hard-codes this epsilon in the latent norms (q_a_layernorm, kv_a_layernorm) of both classes.
LATENT_NORM_EPS = 1e-6
LAYER_PREFIX = "model.layers.{layer}."
ATTENTION = (
    Relation(("input_layernorm.weight",), (P.INPUT_NORM_W,)),
    Relation(("self_attn.q_proj.weight",), (P.Q_W,), when="!mla.q_lora_rank"),
    Relation(("self_attn.q_a_proj.weight",), (P.Q_DOWN_W,), when="mla.q_lora_rank"),
    Relation(("self_attn.q_a_layernorm.weight",), (P.Q_DOWN_NORM_W,), when="mla.q_lora_rank"),
    Relation(("self_attn.q_b_proj.weight",), (P.Q_UP_W,), when="mla.q_lora_rank"),
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
    Relation(("mlp.gate.e_score_correction_bias",), (P.ROUTER_BIAS,), when="moe.router_enable_expert_bias"),
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


def mla_metadata(cfg: dict[str, Any], params_dtype: torch.dtype, mtp_num_layers: int, family: str) -> ModelSpec:
    """What both transformers classes (DeepSeek-V2 and -V3) read alike: MLA dimensions (`q_lora_rank` null: a plain
    query projection), sizes, first-k dense layers, shared experts, RoPE; the router is the caller's."""
    need = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "vocab_size")
    missing = [k for k in need if cfg.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)} ({family} layout)")
    if cfg.get("tie_word_embeddings", False):
        raise ConversionError(f"config.json: tied embeddings are not a {family} layout")
    if cfg.get("first_k_dense_replace", 0) > 3:
        raise ConversionError(f"--first-k-dense-replace {cfg['first_k_dense_replace']}: at most 3 dense layers are supported (seeds)")
    shared = cfg.get("n_shared_experts") or 0
    if not shared:
        raise ConversionError(f"config.json: n_shared_experts must be >= 1 for the {family} layout")
    heads = cfg["num_attention_heads"]
    return ModelSpec(
        model_type="GPT", num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads, num_query_groups=heads,
        kv_channels=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
        seq_length=cfg.get("max_position_embeddings", 4096), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tokenizer_type="HuggingFaceTokenizer", iteration=1, params_dtype=params_dtype, bert_binary_head=False,
        output_layer=True, position_embedding_type="rope", linear_bias=False, qkv_bias=False, norm_has_bias=False,
        swiglu=True, true_vocab_size=cfg["vocab_size"], vocab_size=cfg["vocab_size"], make_vocab_size_divisible_by=128,
        previous_tensor_parallel_size=1, previous_pipeline_parallel_size=1,
        consumed_train_samples=0, consumed_valid_samples=0, normalization="RMSNorm",
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6), rotary_base=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)),
        qk_layernorm=False, hf_config=dict(cfg),
        mla=MLASpec(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"], qk_head_dim=cfg["qk_nope_head_dim"],
                    qk_pos_emb_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"]),
        moe=MoESpec(num_experts=cfg["n_routed_experts"], ffn_hidden_size=cfg["moe_intermediate_size"],
                    first_k_dense_replace=cfg.get("first_k_dense_replace", 0), router_topk=cfg.get("num_experts_per_tok"),
                    shared_expert_intermediate_size=shared * cfg["moe_intermediate_size"],
                    router_topk_scaling_factor=cfg.get("routed_scaling_factor")),
        rope_scaling=rope_scaling.from_hf(cfg, mla=True),
        mtp_num_layers=mtp_num_layers,
    )


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype, mtp_num_layers: int) -> ModelSpec:
    """The model spec of a DeepSeek-V3-class config.json: sigmoid scores, the expert bias added for choosing,
    group-limited, the chosen weights renormalised (a single one is not: megatron-core leaves top-1 as is) and scaled."""
    md = mla_metadata(cfg, params_dtype, mtp_num_layers, "DeepSeek-V3")
    assert md.moe is not None
    if md.moe.router_topk != 1:
        check_normalised_top_k(cfg, default=True)
    return dataclasses.replace(md, moe=dataclasses.replace(
        md.moe, router_num_groups=cfg.get("n_group"), router_group_topk=cfg.get("topk_group"),
        router_score_function=cfg.get("scoring_func", "sigmoid"), router_enable_expert_bias=True))


def hf_config_from_metadata(md: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """A DeepSeek-V3 config.json rebuilt from the spec (no recorded or given config), rope_scaling included
    (q_lora_rank null for a plain query projection; a Kimi-K2 comes out as the DeepSeek-V3 it is read as)."""
    mla, moe = md.mla, md.moe
    assert mla is not None and moe is not None
    shared = moe.shared_expert_intermediate_size or 0
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": vocab_size,
        "hidden_size": md.hidden_size, "intermediate_size": md.ffn_hidden_size, "moe_intermediate_size": moe.ffn_hidden_size,
        "num_hidden_layers": md.num_layers, "num_attention_heads": md.num_attention_heads,
        "num_key_value_heads": md.num_attention_heads, "n_shared_experts": shared // moe.ffn_hidden_size,
        "n_routed_experts": moe.num_experts, "routed_scaling_factor": moe.router_topk_scaling_factor,
        "kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank, "qk_rope_head_dim": mla.qk_pos_emb_head_dim,
        "qk_nope_head_dim": mla.qk_head_dim, "v_head_dim": mla.v_head_dim, "n_group": moe.router_num_groups,
        "topk_group": moe.router_group_topk, "num_experts_per_tok": moe.router_topk,
        "first_k_dense_replace": moe.first_k_dense_replace, "norm_topk_prob": moe.router_topk != 1,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
        "max_position_embeddings": md.max_position_embeddings, "rms_norm_eps": md.norm_epsilon, "rope_theta": md.rotary_base,
        "rope_scaling": rope_scaling.to_hf(md.rope_scaling), "rope_interleave": True,
        "attention_bias": False, "tie_word_embeddings": False, "num_nextn_predict_layers": md.mtp_num_layers,
    }


def check_hf_config(cfg: dict[str, Any], latent_norm_eps: bool = False) -> None:
    """What transformers' DeepSeek-V2 and -V3 classes compute that megatron-core cannot, refused naming the field.
    `latent_norm_eps` converts an `rms_norm_eps` other than 1e-6 anyway (see the error text)."""
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method", "fp8") != "fp8":
        raise ConversionError(f"config.json quantization_config.quant_method {quant.get('quant_method')!r}: only DeepSeek's "
                              "block-scaled FP8 is read (Kimi-K2's INT4 releases, compressed-tensors pack-quantized, are not); "
                              "convert from a bf16 copy")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise ConversionError(f"config.json {field} true: megatron-core's MLA and MoE linears have no bias")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json hidden_act {cfg['hidden_act']!r}: only SwiGLU (silu) MLPs are converted")
    kv_heads = cfg.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != cfg.get("num_attention_heads"):
        raise ConversionError(f"config.json num_key_value_heads {kv_heads} != num_attention_heads {cfg.get('num_attention_heads')}: "
                              "MLA has a key and a value per head")
    if cfg.get("moe_layer_freq", 1) != 1:
        raise ConversionError(f"config.json moe_layer_freq {cfg['moe_layer_freq']}: transformers makes every layer after "
                              "first_k_dense_replace MoE; only moe_layer_freq 1 is converted")
    eps = cfg.get("rms_norm_eps", LATENT_NORM_EPS)
    if eps != LATENT_NORM_EPS and not latent_norm_eps:
        raise ConversionError(f"config.json rms_norm_eps {eps:g}: transformers computes the MLA latent norms (q_a_layernorm, "
                              f"kv_a_layernorm) with eps {LATENT_NORM_EPS:g} whatever the config says, megatron-core every norm "
                              "with one epsilon; refusing rather than converting approximately. --accept-latent-norm-eps converts it "
                              "with rms_norm_eps in those norms too (as vLLM and SGLang run these models)")


def check_hf_router(cfg: dict[str, Any]) -> None:
    """transformers' DeepSeek-V3 router that megatron-core cannot compute, refused naming the field. It always takes
    sigmoid scores and ranks groups by the sum of their two best scores; megatron-core sums the best
    topk / topk_group, the same only when that is 2 (or when every group is kept)."""
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConversionError(f"config.json scoring_func {cfg['scoring_func']!r}: the DeepSeek-V3 class scores experts with "
                              "sigmoid whatever the config says")
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConversionError(f"config.json topk_method {cfg['topk_method']!r}: the DeepSeek-V3 class routes as noaux_tc "
                              "whatever the config says")
    if cfg.get("rope_interleave", True) is not True:
        raise ConversionError("config.json rope_interleave false: megatron-core's MLA always applies RoPE to interleaved pairs")
    topk, norm = cfg.get("num_experts_per_tok"), cfg.get("norm_topk_prob", True)
    if topk == 1 and norm:
        raise ConversionError("config.json num_experts_per_tok 1 with norm_topk_prob true (weight 1 for every token): "
                              "megatron-core does not renormalise a single sigmoid score")
    check_groups(cfg, topk, per_group_best=2, ranking="the sum of its two best scores")


def check_groups(cfg: dict[str, Any], topk: int, per_group_best: int, ranking: str) -> None:
    """Group-limited routing as megatron-core computes it: each group ranked by the sum of its best
    topk // topk_group scores. `per_group_best` is how many transformers sums (`ranking` in words)."""
    groups, kept, experts = cfg.get("n_group") or 1, cfg.get("topk_group") or 1, cfg["n_routed_experts"]
    if experts % groups or kept > groups:
        raise ConversionError(f"config.json n_group {groups} / topk_group {kept} do not split {experts} experts")
    if topk > kept * (experts // groups):
        raise ConversionError(f"config.json num_experts_per_tok {topk} exceeds the {kept * (experts // groups)} experts of "
                              f"the topk_group {kept} groups kept")
    if kept < groups and topk // kept != per_group_best:
        raise ConversionError(f"config.json n_group {groups} / topk_group {kept} / num_experts_per_tok {topk}: transformers ranks "
                              f"each group by {ranking}, megatron-core by the sum of its best num_experts_per_tok // topk_group "
                              f"= {topk // kept}; this group-limited routing has no megatron-core equivalent")


def check_normalised_top_k(cfg: dict[str, Any], default: bool) -> None:
    """Megatron-core renormalises the top-k routing weights (softmax after top-k; sigmoid scores divided
    by their sum), which is HF's `norm_topk_prob: true`; false would convert silently into other routing.
    `default` is transformers' default for the family when the key is absent."""
    if cfg.get("norm_topk_prob", default) is not True:
        raise ConversionError("config.json: norm_topk_prob false (top-k weights not renormalised) has no megatron-core "
                              "equivalent here; only norm_topk_prob true is converted")


def check_config(cfg: dict[str, Any], md: ModelSpec) -> None:
    """The output config.json must describe the checkpoint: its MLA and expert fields, and its class by the router
    (softmax: DeepSeek-V2, sigmoid with expert bias: DeepSeek-V3 / Kimi-K2)."""
    mla, moe = md.mla, md.moe
    assert mla is not None and moe is not None
    checks = (("q_lora_rank", "q_lora_rank", mla.q_lora_rank), ("kv_lora_rank", "kv_lora_rank", mla.kv_lora_rank),
              ("qk_nope_head_dim", "qk_head_dim", mla.qk_head_dim),
              ("qk_rope_head_dim", "qk_pos_emb_head_dim", mla.qk_pos_emb_head_dim), ("v_head_dim", "v_head_dim", mla.v_head_dim),
              ("n_routed_experts", "num_experts", moe.num_experts), ("moe_intermediate_size", "moe_ffn_hidden_size", moe.ffn_hidden_size),
              ("num_experts_per_tok", "moe_router_topk", moe.router_topk),
              ("first_k_dense_replace", "first_k_dense_replace", moe.first_k_dense_replace))
    for hf_key, md_key, value in checks:
        if cfg.get(hf_key) != value:
            raise ConversionError(f"config.json {hf_key}={cfg.get(hf_key)} disagrees with the checkpoint's {md_key}={value}")
    softmax = moe.router_score_function == "softmax"
    if (cfg.get("model_type") or "deepseek_v3") not in (V2_MODEL_TYPES if softmax else V3_MODEL_TYPES):
        raise ConversionError(f"config.json model_type {cfg.get('model_type')!r} disagrees with the checkpoint's "
                              f"{moe.router_score_function} router ({'deepseek_v2' if softmax else 'deepseek_v3 or kimi_k2'})")


def layer_section(md: ModelSpec, layer: int) -> Section:
    return MOE_LAYER if P.is_moe_layer(md, layer) else DENSE_LAYER
