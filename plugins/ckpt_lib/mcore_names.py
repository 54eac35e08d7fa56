"""Megatron-Core state-dict names for protocol keys, with their tensor-parallel rule.

One table per naming profile (`local` and `transformer_engine` specs differ only in where the
norms live). The same table drives the saver (split) and the loader (gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import protocol as P
from .sharding import COLUMN, GATED, REPLICATED, ROW

VOCAB = "vocab"  # column split after padding the vocabulary


@dataclass(frozen=True)
class Param:
    """Megatron name suffix <- protocol keys (two for a gated fc1) split by `rule`.

    `when` lists metadata flags that must all hold; a leading '!' negates one.
    """

    name: str
    keys: tuple[str, ...]
    rule: str
    when: tuple[str, ...] = ()

    def applies(self, md: Any) -> bool:
        for flag in self.when:
            want = not flag.startswith("!")
            if bool(getattr(md, flag.lstrip("!"), False)) != want:
                return False
        return True


def _norm_names(impl: str) -> tuple[str, str]:
    if impl == "transformer_engine":
        return "self_attention.linear_qkv.layer_norm_", "mlp.linear_fc1.layer_norm_"
    return "input_layernorm.", "pre_mlp_layernorm."


def layer_params(impl: str) -> tuple[Param, ...]:
    """Parameters of one dense transformer layer in the given spec."""
    attn_norm, mlp_norm = _norm_names(impl)
    return (
        Param(attn_norm + "weight", (P.INPUT_NORM_W,), REPLICATED),
        Param(attn_norm + "bias", (P.INPUT_NORM_B,), REPLICATED, ("norm_has_bias",)),
        Param("self_attention.linear_qkv.weight", (P.QKV_W,), COLUMN),
        Param("self_attention.linear_qkv.bias", (P.QKV_B,), COLUMN, ("qkv_bias",)),
        Param("self_attention.q_layernorm.weight", (P.Q_NORM_W,), REPLICATED, ("qk_layernorm",)),
        Param("self_attention.k_layernorm.weight", (P.K_NORM_W,), REPLICATED, ("qk_layernorm",)),
        Param("self_attention.linear_proj.weight", (P.DENSE_W,), ROW),
        Param("self_attention.linear_proj.bias", (P.DENSE_B,), REPLICATED, ("linear_bias",)),
        Param(mlp_norm + "weight", (P.POST_NORM_W,), REPLICATED),
        Param(mlp_norm + "bias", (P.POST_NORM_B,), REPLICATED, ("norm_has_bias",)),
        Param("mlp.linear_fc1.weight", (P.FC1_GATE_W, P.FC1_UP_W), GATED, ("swiglu",)),
        Param("mlp.linear_fc1.weight", (P.FC1_W,), COLUMN, ("!swiglu",)),
        Param("mlp.linear_fc1.bias", (P.FC1_GATE_B, P.FC1_UP_B), GATED, ("swiglu", "linear_bias")),
        Param("mlp.linear_fc1.bias", (P.FC1_B,), COLUMN, ("!swiglu", "linear_bias")),
        Param("mlp.linear_fc2.weight", (P.FC2_W,), ROW),
        Param("mlp.linear_fc2.bias", (P.FC2_B,), REPLICATED, ("linear_bias",)),
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
IMPLS = ("local", "transformer_engine")


def detect_impl(names: list[str]) -> str:
    """Which spec a state dict was written with, from its norm names."""
    if any(n.endswith("linear_qkv.layer_norm_weight") for n in names):
        return "transformer_engine"
    return "local"
