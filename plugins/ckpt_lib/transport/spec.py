"""The typed model description that loaders build and savers receive (`ModelSpec`).

Upstream Megatron-LM's queue carries an untyped metadata Namespace with some fifty flat fields; inside this
library the same fields travel grouped and typed: the dimensions every model has at the top, multi-latent
attention, MoE, YaRN RoPE scaling and LoRA export as optional sub-specs (None: the model has no such part).
The top-level fields keep their Namespace names, so code reading only those (the QKV ops, the shape rules)
reads either form. `protocol.py` converts between the two, and only there: `metadata_from_spec` /
`spec_from_metadata`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class MLASpec:
    """Multi-latent attention (DeepSeek-V2/V3), in megatron-core's `MLATransformerConfig` names.
    `q_lora_rank` None: one plain query projection (DeepSeek-V2-Lite, Moonlight)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MoESpec:
    """Routed experts, in Megatron's argument names less their `moe_` prefix (`router_topk` is
    `--moe-router-topk`); `num_experts` and `first_k_dense_replace` keep theirs. The first
    `first_k_dense_replace` layers are dense, the rest MoE (MTP layers too)."""

    num_experts: int
    first_k_dense_replace: int
    ffn_hidden_size: int
    shared_expert_intermediate_size: int | None = None  # None: no shared expert (Qwen3-MoE, Mixtral)
    router_topk: int | None = None
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    router_topk_scaling_factor: float | None = None
    router_score_function: str | None = None
    router_enable_expert_bias: bool = True  # only an explicit False (Qwen3-MoE) drops the bias
    router_pre_softmax: bool | None = None  # None: the source did not say (megatron-core's default, False)
    shared_expert_gate: bool = False  # a sigmoid gate on the shared expert (Qwen2-MoE)


@dataclass(frozen=True)
class RopeScaling:
    """YaRN RoPE scaling of MLA models, in megatron-core's meaning (see families/rope_scaling.py)."""

    factor: float
    mscale: float
    mscale_all_dim: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float


@dataclass(frozen=True)
class LoraExport:
    """The adapter `saver_hf` writes as PEFT instead of the model: its rank, alpha and rsLoRA scaling."""

    r: int
    alpha: float
    rslora: bool


@dataclass(frozen=True)
class ModelSpec:
    """One model, as a loader read it and a saver writes it, plus the training progress that travels with it."""

    model_type: str
    num_layers: int  # decoder layers, MTP layers not counted
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    seq_length: int | None
    max_position_embeddings: int | None
    position_embedding_type: str
    rotary_base: float
    normalization: str
    norm_epsilon: float
    norm_has_bias: bool
    swiglu: bool
    linear_bias: bool
    qkv_bias: bool
    qk_layernorm: bool
    output_layer: bool  # untied output layer
    true_vocab_size: int | None
    vocab_size: int | None
    make_vocab_size_divisible_by: int
    params_dtype: torch.dtype
    tokenizer_type: str | None
    bert_binary_head: bool
    iteration: int | str
    consumed_train_samples: int
    consumed_valid_samples: int
    previous_tensor_parallel_size: int
    previous_pipeline_parallel_size: int
    hf_config: dict[str, Any] | None  # the source config.json, so that mcore -> HF can restore it
    hf_model_type: str | None = None  # the HF family the loader read, for `saver_hf` without a config
    rotary_percent: float = 1.0  # RoPE on this fraction of each head's dimensions (GLM-4.5)
    mla: MLASpec | None = None
    moe: MoESpec | None = None
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    mtp_num_layers: int = 0
    lora_export: LoraExport | None = None
    source_quantization: dict[str, Any] | None = None  # an FP8 source's quantization, when its config lacks it
    share_layers: tuple[int, ...] | None = None  # the layers this loader sends (a worker's share); None: all

    @property
    def learned_absolute(self) -> bool:
        return self.position_embedding_type == "learned_absolute"


def flag_holds(spec: Any, flag: str) -> bool:
    """Whether a spec flag holds, for declarative tables: a field path (`qkv_bias`, `mla.q_lora_rank`,
    `moe.shared_expert_gate`; a missing sub-spec is false), `!` in front negating it."""
    value = spec
    for name in flag.lstrip("!").split("."):
        value = getattr(value, name, None)
    return bool(value) != flag.startswith("!")
