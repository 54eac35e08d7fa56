"""Megatron-Core state-dict names for protocol keys, with their tensor-parallel rule.

One table per naming profile (`local` and `transformer_engine` specs differ only in where the
norms live). The same table drives the saver (split) and the loader (gather).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout.sharding import COLUMN, GATED, REPLICATED, ROW
from ..transport import protocol as P
from ..transport.spec import ModelSpec, flag_holds

VOCAB = "vocab"  # column split after padding the vocabulary


@dataclass(frozen=True)
class Param:
    """Megatron name suffix <- protocol keys (two for a gated fc1) split by `rule`.

    `when` lists spec flags (`spec.flag_holds`) that must all hold; a leading '!' negates one.
    """

    name: str
    keys: tuple[str, ...]
    rule: str
    when: tuple[str, ...] = ()
    fp32: bool = False  # kept in fp32 whatever the params dtype (Megatron's router expert_bias)

    def applies(self, md: ModelSpec) -> bool:
        return all(flag_holds(md, flag) for flag in self.when)


TE = "transformer_engine"
SHARED = "moe.shared_expert_intermediate_size"  # None or 0 (Qwen3-MoE): no shared expert


def attention_params(md: ModelSpec | None, impl: str, whole_mla_down: bool = False) -> tuple[Param, ...]:
    """Self-attention of one layer: GQA (dense GPT) or MLA (DeepSeek-V3)."""
    if md is not None and md.mla is not None:
        return mla_params(impl, whole_mla_down)
    norm = "self_attention.linear_qkv.layer_norm_" if impl == TE else "input_layernorm."
    return (
        Param(norm + "weight", (P.INPUT_NORM_W,), REPLICATED),
        Param(norm + "bias", (P.INPUT_NORM_B,), REPLICATED, ("norm_has_bias",)),
        Param("self_attention.linear_qkv.weight", (P.QKV_W,), COLUMN),
        Param("self_attention.linear_qkv.bias", (P.QKV_B,), COLUMN, ("qkv_bias",)),
        Param("self_attention.q_layernorm.weight", (P.Q_NORM_W,), REPLICATED, ("qk_layernorm",)),
        Param("self_attention.k_layernorm.weight", (P.K_NORM_W,), REPLICATED, ("qk_layernorm",)),
        Param("self_attention.linear_proj.weight", (P.DENSE_W,), ROW),
        Param("self_attention.linear_proj.bias", (P.DENSE_B,), REPLICATED, ("linear_bias",)),
    )


def mla_params(impl: str, whole_down: bool = False) -> tuple[Param, ...]:
    """MLA: the local spec splits the down projections over TP (ColumnParallelLinear), the TE spec
    keeps them whole (TELinear 'duplicated') and fuses the latent norms into the up projections;
    MindSpeed-LLM keeps them whole with local names (`whole_down`). Without a query LoRA rank
    (`q_lora_rank` None) megatron-core has one column-parallel `linear_q_proj` in every spec."""
    down = REPLICATED if impl == TE or whole_down else COLUMN
    q_norm = "self_attention.linear_q_up_proj.layer_norm_weight" if impl == TE else "self_attention.q_layernorm.weight"
    kv_norm = "self_attention.linear_kv_up_proj.layer_norm_weight" if impl == TE else "self_attention.kv_layernorm.weight"
    return (
        Param("input_layernorm.weight", (P.INPUT_NORM_W,), REPLICATED),
        Param("self_attention.linear_q_proj.weight", (P.Q_W,), COLUMN, ("!mla.q_lora_rank",)),
        Param("self_attention.linear_q_down_proj.weight", (P.Q_DOWN_W,), down, ("mla.q_lora_rank",)),
        Param(q_norm, (P.Q_DOWN_NORM_W,), REPLICATED, ("mla.q_lora_rank",)),
        Param("self_attention.linear_q_up_proj.weight", (P.Q_UP_W,), COLUMN, ("mla.q_lora_rank",)),
        Param("self_attention.linear_kv_down_proj.weight", (P.KV_DOWN_W,), down),
        Param(kv_norm, (P.KV_DOWN_NORM_W,), REPLICATED),
        Param("self_attention.linear_kv_up_proj.weight", (P.KV_UP_W,), COLUMN),
        Param("self_attention.linear_proj.weight", (P.DENSE_W,), ROW),
    )


def mlp_params(md: ModelSpec | None, impl: str, moe: bool) -> tuple[Param, ...]:
    """The MLP of one layer without its routed experts: dense MLP, or router (+ expert bias, + shared
    expert, + its sigmoid gate, each only when the metadata says the model has it)."""
    if moe:  # the TE spec keeps pre_mlp_layernorm separate for MoE layers
        return (
            Param("pre_mlp_layernorm.weight", (P.POST_NORM_W,), REPLICATED),
            Param("mlp.router.weight", (P.ROUTER_W,), REPLICATED),
            Param("mlp.router.expert_bias", (P.ROUTER_BIAS,), REPLICATED, ("moe.router_enable_expert_bias",), fp32=True),
            Param("mlp.shared_experts.linear_fc1.weight", (P.SHARED_FC1_GATE_W, P.SHARED_FC1_UP_W), GATED, (SHARED,)),
            Param("mlp.shared_experts.linear_fc2.weight", (P.SHARED_FC2_W,), ROW, (SHARED,)),
            Param("mlp.shared_experts.gate_weight", (P.SHARED_GATE_W,), REPLICATED, (SHARED, "moe.shared_expert_gate")),
        )
    norm = "mlp.linear_fc1.layer_norm_" if impl == TE else "pre_mlp_layernorm."
    return (
        Param(norm + "weight", (P.POST_NORM_W,), REPLICATED),
        Param(norm + "bias", (P.POST_NORM_B,), REPLICATED, ("norm_has_bias",)),
        Param("mlp.linear_fc1.weight", (P.FC1_GATE_W, P.FC1_UP_W), GATED, ("swiglu",)),
        Param("mlp.linear_fc1.weight", (P.FC1_W,), COLUMN, ("!swiglu",)),
        Param("mlp.linear_fc1.bias", (P.FC1_GATE_B, P.FC1_UP_B), GATED, ("swiglu", "linear_bias")),
        Param("mlp.linear_fc1.bias", (P.FC1_B,), COLUMN, ("!swiglu", "linear_bias")),
        Param("mlp.linear_fc2.weight", (P.FC2_W,), ROW),
        Param("mlp.linear_fc2.bias", (P.FC2_B,), REPLICATED, ("linear_bias",)),
    )


def layer_params(impl: str, md: ModelSpec | None = None, moe: bool = False, whole_mla_down: bool = False) -> tuple[Param, ...]:
    """Parameters of one transformer layer (without routed experts)."""
    return attention_params(md, impl, whole_mla_down) + mlp_params(md, impl, moe)


def expert_params(impl: str, grouped_gemm: bool = False) -> tuple[Param, ...]:
    """One routed expert; `{expert}` is its local index on the EP rank. Split by expert-TP.

    TE with grouped GEMM is TEGroupedMLP; otherwise SequentialMLP names (the local spec's legacy
    GroupedMLP `weight1`/`weight2` are produced from these by `mindspeed.group_experts`)."""
    if impl == TE and grouped_gemm:  # TEGroupedMLP
        fc1, fc2 = "mlp.experts.linear_fc1.weight{expert}", "mlp.experts.linear_fc2.weight{expert}"
    else:  # SequentialMLP
        fc1, fc2 = "mlp.experts.local_experts.{expert}.linear_fc1.weight", "mlp.experts.local_experts.{expert}.linear_fc2.weight"
    return (Param(fc1, (P.FC1_GATE_W, P.FC1_UP_W), GATED), Param(fc2, (P.FC2_W,), ROW))


MTP_PREFIX = "mtp.layers.{index}."
MTP_LAYER_PREFIX = "mtp.layers.{index}.{submodule}."  # submodule: mcore_version.MTP_SUBMODULES
MTP_PARAMS = (
    Param("enorm.weight", (P.MTP_ENORM_W,), REPLICATED),
    Param("hnorm.weight", (P.MTP_HNORM_W,), REPLICATED),
    Param("eh_proj.weight", (P.MTP_EH_PROJ_W,), COLUMN),
    Param("final_layernorm.weight", (P.MTP_NORM_W,), REPLICATED),
)


LAYER_PREFIX = "decoder.layers.{layer}."
EMBEDDING_PARAMS = (
    Param("embedding.word_embeddings.weight", (P.WORD_EMB,), VOCAB),
    Param("embedding.position_embeddings.weight", (P.POS_EMB,), REPLICATED, ("learned_absolute",)),
)
FINAL_NORM_PARAMS = (
    Param("decoder.final_layernorm.weight", ("weight",), REPLICATED),
    Param("decoder.final_layernorm.bias", ("bias",), REPLICATED, ("norm_has_bias",)),
)
OUTPUT_PARAMS = (Param("output_layer.weight", ("weight",), VOCAB),)
IMPLS = ("local", TE)


def detect_impl(names: list[str]) -> str:
    """Which spec a state dict was written with, from its norm names."""
    if any(n.endswith(("linear_qkv.layer_norm_weight", "linear_q_up_proj.layer_norm_weight", "linear_kv_up_proj.layer_norm_weight",
                       "mlp.experts.linear_fc1.weight0", "linear_fc1.layer_norm_weight")) for n in names):
        return TE
    return "local"
