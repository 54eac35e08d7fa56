"""Qwen3-MoE in HuggingFace naming (GQA with q/k norm, softmax top-k router, routed experts only) <-> protocol.

transformers 5 holds the experts fused in memory (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows
first, and `mlp.experts.down_proj` [E, H, I]) but saves them per expert (`mlp.experts.{e}.gate_proj.weight`,
...), the DeepSeek-V3 names, so `deepseek.EXPERTS` serves both; `FUSED_EXPERTS` reads checkpoints that
carry the in-memory layout. No shared expert, no router bias. Dense layers (`mlp_only_layers`,
`decoder_sparse_step`) are `dense.LAYER` with `intermediate_size`. Its metadata builder, router rules and
config checks serve Qwen2-MoE and Mixtral too; `hf_moe` picks among the three.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from ..transport.spec import ModelSpec, MoESpec
from . import MoeTables, Op, Relation, Section, deepseek, dense

MODEL_TYPE, EXPERT_SIZE = "qwen3_moe", "moe_intermediate_size"


def _split_gate_up(tensors: tuple[torch.Tensor, ...], md: Any) -> tuple[torch.Tensor, ...]:
    """[E, 2I, H] -> gate [E, I, H], up [E, I, H] (transformers' `chunk(2, dim=-1)` of the output)."""
    (fused,) = tensors
    width = md.moe.ffn_hidden_size
    if fused.shape[1] != 2 * width:
        raise ConversionError(f"gate_up_proj has {fused.shape[1]} rows per expert, expected 2 x {width}")
    return tuple(fused.split(width, dim=1))


def _join_gate_up(tensors: tuple[torch.Tensor, ...], md: Any) -> tuple[torch.Tensor, ...]:
    return (torch.cat(tensors, dim=1),)


GATE_UP = Op("gate-up-split", _split_gate_up, _join_gate_up)

ATTENTION = tuple(r for r in dense.LAYER.relations if not r.source[0].startswith("mlp."))
LAYER = Section(None, dense.LAYER.prefix, ATTENTION + (Relation(("mlp.gate.weight",), (P.ROUTER_W,)),))
# Stacked over all experts: a relation without `{expert}` is read as one [E, ...] tensor, sliced per message.
FUSED_EXPERTS = Section(None, dense.LAYER.prefix, (
    Relation(("mlp.experts.gate_up_proj",), (P.FC1_GATE_W, P.FC1_UP_W), GATE_UP),
    Relation(("mlp.experts.down_proj",), (P.FC2_W,)),
))
TABLES, FUSED_TABLES = MoeTables(LAYER, dense.LAYER, deepseek.EXPERTS), MoeTables(LAYER, dense.LAYER, FUSED_EXPERTS)
EXPERTS = TABLES.experts  # written per expert, as transformers 5 saves


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


def moe_metadata(cfg: dict[str, Any], params_dtype: torch.dtype, family: str, dense_family: str, expert_size: str,
                 norm_topk: bool, norm_why: str = "norm_topk_prob true") -> ModelSpec:
    """The model spec of a softmax top-k MoE over routed experts on `dense_family`'s attention (HF `family`:
    Qwen3-MoE, Qwen2-MoE, Mixtral); `expert_size` names the config field of an expert's width, `norm_why` what
    makes the router renormalise. Refuses what megatron-core cannot express.

    Router: transformers takes softmax over all experts, then the top k, then (`norm_topk`) divides
    by their sum. megatron-core's `softmax` score function with `moe_router_pre_softmax=False` takes the top
    k logits and a softmax over those k, the same renormalised weights; without renormalisation it is
    `moe_router_pre_softmax=True` (softmax over all, then top k, not renormalised)."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    need = {"num_experts": experts, "num_experts_per_tok": cfg.get("num_experts_per_tok"), expert_size: cfg.get(expert_size)}
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}")
    if experts < 1:
        raise ConversionError(f"config.json: num_experts {experts}: a model without experts is a dense {dense_family} "
                              f"(model_type {dense_family})")
    topk = cfg["num_experts_per_tok"]
    if not 1 <= topk <= experts:
        raise ConversionError(f"config.json: num_experts_per_tok {topk} is not in 1..num_experts {experts}")
    if topk == 1 and norm_topk:
        raise ConversionError(f"config.json: num_experts_per_tok 1 with {norm_why} (every weight 1) has no megatron-core "
                              "equivalent (its softmax after a top-1 is refused)")
    first_k = first_dense_layers(cfg)
    md = dense.metadata_from_hf(cfg, params_dtype, dense_family)
    return dataclasses.replace(md, hf_model_type=family, moe=MoESpec(
        num_experts=experts, ffn_hidden_size=cfg[expert_size], first_k_dense_replace=first_k, router_topk=topk,
        router_score_function="softmax", router_pre_softmax=not norm_topk, router_enable_expert_bias=False))


def metadata_from_hf(cfg: dict[str, Any], params_dtype: torch.dtype) -> ModelSpec:
    """The model spec of a Qwen3-MoE config.json (`norm_topk_prob` renormalises the top-k weights)."""
    if cfg.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window true is not supported (megatron-core GPT attends to all tokens)")
    return moe_metadata(cfg, params_dtype, MODEL_TYPE, "qwen3", EXPERT_SIZE, bool(cfg.get("norm_topk_prob", False)))


def hf_tables(md: ModelSpec, has: Callable[[str], bool]) -> MoeTables:
    """The experts' on-disk layout: per expert (what transformers 5 saves) or fused [E, ...] (its in-memory
    parameters), decided by the first MoE layer; the loader's validation then holds every layer to it."""
    assert md.moe is not None
    fused = has(f"model.layers.{md.moe.first_k_dense_replace}.mlp.experts.gate_up_proj")
    return FUSED_TABLES if fused else TABLES


def layer_section(md: ModelSpec, layer: int) -> Section:
    return TABLES.layer_section(md, layer)


def plain_softmax_router(moe: MoESpec) -> bool:
    """A softmax top-k router without groups, scaling factor or expert bias, the only router of these HF families."""
    return (moe.router_score_function in (None, "softmax") and not moe.router_enable_expert_bias
            and not moe.router_num_groups and not moe.router_topk_scaling_factor)


def flags(md: ModelSpec) -> str:
    """The settings that tell these families apart, for error lines."""
    moe = md.moe
    assert moe is not None
    named = {"q/k norm": md.qk_layernorm, "qkv bias": md.qkv_bias,
             "shared expert": moe.shared_expert_intermediate_size, "shared-expert gate": moe.shared_expert_gate,
             "router": moe.router_score_function, "pre-softmax": moe.router_pre_softmax or False,
             "expert bias": moe.router_enable_expert_bias, "groups": moe.router_num_groups,
             "scaling factor": moe.router_topk_scaling_factor, "dense layers": moe.first_k_dense_replace}
    return ", ".join(f"{k} {v}" for k, v in named.items())


def holds(md: ModelSpec) -> bool:
    """The checkpoint's flags are Qwen3-MoE's: q/k norm, routed experts only."""
    return (md.moe is not None and md.qk_layernorm and not md.moe.shared_expert_intermediate_size
            and plain_softmax_router(md.moe))


def check(md: ModelSpec) -> None:
    """What a qwen3_moe config.json cannot say about a checkpoint."""
    if not holds(md):
        raise ConversionError(f"the checkpoint ({flags(md)}) is not a Qwen3-MoE (q/k norm, softmax router, routed experts only)")


def check_moe_config(cfg: dict[str, Any], md: ModelSpec, family: str, expert_size: str) -> None:
    """The output config.json must be of the checkpoint's family, with its experts, top-k and expert width."""
    moe = md.moe
    assert moe is not None
    if cfg.get("model_type", family) != family:
        raise ConversionError(f"config.json model_type {cfg['model_type']!r} is not {family} (the checkpoint's family)")
    for key, got, want in (("num_experts", cfg.get("num_experts", cfg.get("num_local_experts")), moe.num_experts),
                           ("num_experts_per_tok", cfg.get("num_experts_per_tok"), moe.router_topk),
                           (expert_size, cfg.get(expert_size), moe.ffn_hidden_size)):
        if got is not None and got != want:
            raise ConversionError(f"config.json {key}={got} disagrees with the checkpoint's {want}")


def check_config(cfg: dict[str, Any], md: ModelSpec) -> None:
    """The output config.json's router must be the checkpoint's (`moe_router_pre_softmax` = not `norm_topk_prob`)."""
    check_moe_config(cfg, md, MODEL_TYPE, EXPERT_SIZE)
    pre = md.moe.router_pre_softmax if md.moe else None
    if pre is not None and bool(cfg.get("norm_topk_prob", False)) == bool(pre):
        raise ConversionError(f"config.json norm_topk_prob={cfg.get('norm_topk_prob', False)} disagrees with the checkpoint's "
                              f"moe_router_pre_softmax={pre}")


def hf_config_from_metadata(md: ModelSpec, vocab_size: int) -> dict[str, Any]:
    raise ConversionError("Qwen3-MoE output needs --hf-config-dir (its config.json is not rebuilt from metadata)")
