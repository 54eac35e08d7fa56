"""Qwen3-MoE in HuggingFace naming (GQA with q/k norm, softmax top-k router, routed experts only) <-> protocol.

transformers 5 holds the experts fused in memory (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows
first, and `mlp.experts.down_proj` [E, H, I]) but saves them per expert (`mlp.experts.{e}.gate_proj.weight`,
...), the DeepSeek-V3 names, so `deepseek.EXPERTS` serves both; `FUSED_EXPERTS` reads checkpoints that
carry the in-memory layout. No shared expert, no router bias. Dense layers (`mlp_only_layers`,
`decoder_sparse_step`) are `dense.LAYER` with `intermediate_size`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from . import Op, Relation, Section, dense


def _split_gate_up(tensors: tuple[torch.Tensor, ...], md: Any) -> tuple[torch.Tensor, ...]:
    """[E, 2I, H] -> gate [E, I, H], up [E, I, H] (transformers' `chunk(2, dim=-1)` of the output)."""
    (fused,) = tensors
    if fused.shape[1] != 2 * md.moe_ffn_hidden_size:
        raise ConversionError(f"gate_up_proj has {fused.shape[1]} rows per expert, expected 2 x {md.moe_ffn_hidden_size}")
    return tuple(fused.split(md.moe_ffn_hidden_size, dim=1))


def _join_gate_up(tensors: tuple[torch.Tensor, ...], md: Any) -> tuple[torch.Tensor, ...]:
    return (torch.cat(tensors, dim=1),)


GATE_UP = Op("gate-up-split", _split_gate_up, _join_gate_up)

ATTENTION = tuple(r for r in dense.LAYER.relations if not r.source[0].startswith("mlp."))
LAYER = Section(None, dense.LAYER.prefix, ATTENTION + (Relation(("mlp.gate.weight",), (P.ROUTER_W,)),))
DENSE_LAYER = dense.LAYER
# Stacked over all experts: a relation without `{expert}` is read as one [E, ...] tensor, sliced per message.
FUSED_EXPERTS = Section(None, dense.LAYER.prefix, (
    Relation(("mlp.experts.gate_up_proj",), (P.FC1_GATE_W, P.FC1_UP_W), GATE_UP),
    Relation(("mlp.experts.down_proj",), (P.FC2_W,)),
))


def layer_section(md: argparse.Namespace, layer: int) -> Section:
    return LAYER if P.is_moe_layer(md, layer) else DENSE_LAYER


def first_dense_layers(cfg: dict[str, Any]) -> int:
    """How many leading layers are dense; transformers' rule: layer i is MoE iff i not in `mlp_only_layers`
    and (i + 1) % `decoder_sparse_step` == 0. The protocol (and Megatron's `first_k_dense_replace`) only
    expresses "the first k layers dense", so any other pattern is refused."""
    layers, step = cfg["num_hidden_layers"], cfg.get("decoder_sparse_step") or 1
    only = set(cfg.get("mlp_only_layers") or ())
    moe = [i not in only and (i + 1) % step == 0 for i in range(layers)]
    k = moe.index(True) if True in moe else layers
    if k == layers or not all(moe[k:]):
        raise ConversionError(f"config.json: mlp_only_layers {sorted(only)} / decoder_sparse_step {step} make layers "
                              f"{[i for i, m in enumerate(moe) if not m]} dense; only the first k layers can be dense "
                              "(Megatron's first_k_dense_replace), with at least one MoE layer")
    return k


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype) -> argparse.Namespace:
    """Protocol metadata for a Qwen3-MoE config.json; refuses what megatron-core cannot express.

    Router: transformers takes softmax over all experts, then the top k, then (`norm_topk_prob`) divides
    by their sum. megatron-core's `softmax` score function with `moe_router_pre_softmax=False` takes the top
    k logits and a softmax over those k, the same renormalised weights; `norm_topk_prob: false` is
    `moe_router_pre_softmax=True` (softmax over all, then top k, not renormalised)."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    need = {"num_experts": experts, "num_experts_per_tok": cfg.get("num_experts_per_tok"),
            "moe_intermediate_size": cfg.get("moe_intermediate_size")}
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}")
    if experts < 1:
        raise ConversionError(f"config.json: num_experts {experts}: a model without experts is a dense Qwen3 (model_type qwen3)")
    topk, norm_topk = cfg["num_experts_per_tok"], bool(cfg.get("norm_topk_prob", False))
    if not 1 <= topk <= experts:
        raise ConversionError(f"config.json: num_experts_per_tok {topk} is not in 1..num_experts {experts}")
    if topk == 1 and norm_topk:
        raise ConversionError("config.json: num_experts_per_tok 1 with norm_topk_prob true (every weight 1) has no megatron-core "
                              "equivalent (its softmax after a top-1 is refused)")
    if cfg.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window true is not supported (megatron-core GPT attends to all tokens)")
    first_k = first_dense_layers(cfg)
    md = dense.metadata_from_hf(cfg, params_dtype, "qwen3")
    md.num_experts = experts
    md.moe_ffn_hidden_size, md.moe_shared_expert_intermediate_size = cfg["moe_intermediate_size"], None
    md.first_k_dense_replace, md.moe_router_topk = first_k, topk
    md.moe_router_num_groups = md.moe_router_group_topk = md.moe_router_topk_scaling_factor = None
    md.moe_router_score_function, md.moe_router_pre_softmax = "softmax", not norm_topk
    md.moe_router_enable_expert_bias, md.mtp_num_layers = False, 0
    return md


def check_config(cfg: dict[str, Any], md: argparse.Namespace) -> None:
    """The output config.json's router must be the checkpoint's (`moe_router_pre_softmax` = not `norm_topk_prob`)."""
    pre = getattr(md, "moe_router_pre_softmax", None)
    if pre is not None and bool(cfg.get("norm_topk_prob", False)) == bool(pre):
        raise ConversionError(f"config.json norm_topk_prob={cfg.get('norm_topk_prob', False)} disagrees with the checkpoint's "
                              f"moe_router_pre_softmax={pre}")


def check(md: argparse.Namespace) -> None:
    """An MoE model without MLA is written as Qwen3-MoE, which has nowhere to put these."""
    extra = [f for f in ("moe_shared_expert_intermediate_size", "moe_router_enable_expert_bias") if getattr(md, f, None)]
    if extra:
        raise ConversionError(f"MoE without MLA is saved as Qwen3-MoE, which has no {' / '.join(extra)}")
