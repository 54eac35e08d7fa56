"""Mixtral in HuggingFace naming (GQA, softmax top-k router renormalised, routed experts only, every layer
MoE) <-> protocol.

On disk (releases, and transformers 5.23's `save_pretrained`): router `block_sparse_moe.gate.weight`, experts
`block_sparse_moe.experts.{e}.w1/w3/w2.weight` = gate/up/down. transformers 5 holds them as
`mlp.gate.weight`, `mlp.experts.gate_up_proj` [E, 2I, H] (w1 rows first) and `mlp.experts.down_proj`
[E, H, I], and reads either prefix with either expert layout; so is read here, decided by the first layer.
Written: the release names. The expert width is `intermediate_size`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from ..transport.spec import ModelSpec
from . import MoeTables, Relation, Section, dense, qwen3_moe

MODEL_TYPE, ARCHITECTURE, EXPERT_SIZE = "mixtral", "MixtralForCausalLM", "intermediate_size"
RELEASE, IN_MEMORY = "block_sparse_moe.", "mlp."


def tables(moe: str, fused: bool) -> MoeTables:
    """The tables with router and experts under `moe` (RELEASE or IN_MEMORY), experts per expert or fused."""
    layer = Section(None, dense.LAYER.prefix, qwen3_moe.ATTENTION + (Relation((moe + "gate.weight",), (P.ROUTER_W,)),))
    if fused:
        experts = (Relation((moe + "experts.gate_up_proj",), (P.FC1_GATE_W, P.FC1_UP_W), qwen3_moe.GATE_UP),
                   Relation((moe + "experts.down_proj",), (P.FC2_W,)))
    else:
        experts = (Relation((moe + "experts.{expert}.w1.weight",), (P.FC1_GATE_W,)),
                   Relation((moe + "experts.{expert}.w3.weight",), (P.FC1_UP_W,)),
                   Relation((moe + "experts.{expert}.w2.weight",), (P.FC2_W,)))
    return MoeTables(layer, dense.LAYER, Section(None, dense.LAYER.prefix, experts))


TABLES = {(moe, fused): tables(moe, fused) for moe in (RELEASE, IN_MEMORY) for fused in (False, True)}
WRITTEN = TABLES[(RELEASE, False)]
EXPERTS = WRITTEN.experts


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype) -> ModelSpec:
    """The model spec of a Mixtral config.json: Mistral attention, experts `num_local_experts` (transformers
    5) or `num_experts` (some exports), softmax top-k always renormalised (`moe_router_pre_softmax` false)."""
    if cfg.get("sliding_window") is not None:
        raise ConversionError(f"config.json: sliding_window {cfg['sliding_window']} is not supported (megatron-core GPT attends "
                              "to all tokens; null converts)")
    return qwen3_moe.moe_metadata(cfg, params_dtype, MODEL_TYPE, "mistral", EXPERT_SIZE, True, "Mixtral's renormalised top-k weights")


def holds(md: ModelSpec) -> bool:
    """The checkpoint's flags are Mixtral's: every layer MoE, no q/k norm, no qkv bias, no shared expert, top-k
    renormalised."""
    moe = md.moe
    return (moe is not None and not moe.first_k_dense_replace and not md.qk_layernorm and not md.qkv_bias
            and not moe.shared_expert_intermediate_size and not moe.router_pre_softmax and qwen3_moe.plain_softmax_router(moe))


def check(md: ModelSpec) -> None:
    """What a mixtral config.json cannot say about a checkpoint."""
    if not holds(md):
        raise ConversionError(f"the checkpoint ({qwen3_moe.flags(md)}) is not a Mixtral (every layer MoE, softmax top-k "
                              "renormalised, no shared expert, no q/k norm, no qkv bias)")


def hf_tables(md: ModelSpec, has: Callable[[str], bool]) -> MoeTables:
    """The prefix (from the router's name) and expert layout of the first MoE layer."""
    assert md.moe is not None
    layer = f"model.layers.{md.moe.first_k_dense_replace}."
    moe = IN_MEMORY if has(layer + IN_MEMORY + "gate.weight") else RELEASE
    return TABLES[(moe, has(layer + moe + "experts.gate_up_proj"))]


def layer_section(md: ModelSpec, layer: int) -> Section:
    return WRITTEN.layer_section(md, layer)


def check_config(cfg: dict[str, Any], md: ModelSpec) -> None:
    """The output config.json's family and experts must be the checkpoint's (Mixtral's router has no switch); a
    sliding window would not be this model."""
    qwen3_moe.check_moe_config(cfg, md, MODEL_TYPE, EXPERT_SIZE)
    if cfg.get("sliding_window") is not None:
        raise ConversionError(f"config.json sliding_window={cfg['sliding_window']}: the checkpoint attends to all tokens (null)")


def hf_config_from_metadata(md: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """A Mixtral config.json from the checkpoint's flags alone (a checkpoint with no recorded config)."""
    moe = md.moe
    assert moe is not None
    cfg = dense.hf_config_from_metadata(md, vocab_size)
    cfg.pop("attention_bias", None)
    cfg.update({"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, EXPERT_SIZE: moe.ffn_hidden_size,
                "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.router_topk, "sliding_window": None})
    return cfg
