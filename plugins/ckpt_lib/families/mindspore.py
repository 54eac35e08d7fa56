"""MindSpore Transformers naming variants (dense GPT) <-> protocol.

Layouts are not recorded in the files and changed between releases (checked against mindformers
1.9.0, whose training config fields are quoted):
- `linear_qkv`: Megatron per-query-group interleaved by default
  (`use_contiguous_weight_layout_attention: False`); plain [Q; K; V] when that option is True, the
  only layout of the 1.6-era `use_contiguous_weight_layout: True` default. Legacy `attention.w_qkv`
  as written by mindformers' `convert_qkv_concat_weight` is Megatron-interleaved too.
- `linear_fc1`: row-interleaved gate0, up0, gate1, up1, ... by default
  (`use_interleaved_weight_layout_mlp: True`, since 1.7); [gate; up] when False. Legacy
  `feed_forward.w_gate_hidden` is row-interleaved too.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import protocol as P
from . import QKV, RENAME, Op, Relation, Section, Tensors


def _deinterleave_rows(tensors: Tensors, md: Any) -> Tensors:
    (fused,) = tensors
    return fused[0::2], fused[1::2]


def _interleave_rows(tensors: Tensors, md: Any) -> Tensors:
    gate, up = tensors
    return (torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:]),)


def _split_halves(tensors: Tensors, md: Any) -> Tensors:
    return tuple(torch.chunk(tensors[0], 2, dim=0))


def _join_halves(tensors: Tensors, md: Any) -> Tensors:
    return (torch.cat(tensors, dim=0),)


def _plain_to_interleaved_qkv(tensors: Tensors, md: Any) -> Tensors:
    (plain,) = tensors
    q_rows, kv_rows = md.num_attention_heads * md.kv_channels, md.num_query_groups * md.kv_channels
    return QKV.forward(tuple(torch.split(plain, [q_rows, kv_rows, kv_rows], dim=0)), md)


def _interleaved_to_plain_qkv(tensors: Tensors, md: Any) -> Tensors:
    return (torch.cat(QKV.backward(tensors, md), dim=0),)


FC1_INTERLEAVED = Op("fc1-row-interleaved", _deinterleave_rows, _interleave_rows)
FC1_CONTIGUOUS = Op("fc1-contiguous", _split_halves, _join_halves)
QKV_PLAIN = Op("qkv-plain", _plain_to_interleaved_qkv, _interleaved_to_plain_qkv)


def mcore_sections(qkv_interleaved: bool, fc1_interleaved: bool) -> tuple[Section, Section, Section, Section]:
    """Tables for the "mcore" architecture (Qwen3 / Qwen2 / Llama from 1.7): Megatron names, no `model.` prefix."""
    qkv = RENAME if qkv_interleaved else QKV_PLAIN
    fc1 = FC1_INTERLEAVED if fc1_interleaved else FC1_CONTIGUOUS
    layer = Section(None, "decoder.layers.{layer}.", (
        Relation(("input_layernorm.weight",), (P.INPUT_NORM_W,)),
        Relation(("self_attention.linear_qkv.weight",), (P.QKV_W,), qkv),
        Relation(("self_attention.linear_qkv.bias",), (P.QKV_B,), qkv, when="qkv_bias"),
        Relation(("self_attention.q_layernorm.weight",), (P.Q_NORM_W,), when="qk_layernorm"),
        Relation(("self_attention.k_layernorm.weight",), (P.K_NORM_W,), when="qk_layernorm"),
        Relation(("self_attention.linear_proj.weight",), (P.DENSE_W,)),
        Relation(("pre_mlp_layernorm.weight",), (P.POST_NORM_W,)),
        Relation(("mlp.linear_fc1.weight",), (P.FC1_GATE_W, P.FC1_UP_W), fc1),
        Relation(("mlp.linear_fc2.weight",), (P.FC2_W,)),
    ))
    return (
        Section(P.EMBEDDINGS, "", (Relation(("embedding.word_embeddings.weight",), (P.WORD_EMB,)),)),
        layer,
        Section(P.FINAL_NORM, "", (Relation(("decoder.final_layernorm.weight",), ("weight",)),)),
        Section(P.OUTPUT_LAYER, "", (Relation(("output_layer.weight",), ("weight",)),), when="output_layer"),
    )


def legacy_sections(fused_qkv: bool, fused_fc1: bool, qkv_interleaved: bool = True) -> tuple[Section, Section, Section, Section]:
    """Tables for the legacy Llama naming (`model.layers.N.attention.wq`, `feed_forward.w1`, ...).
    mindformers' `convert_qkv_concat_weight` writes `w_qkv` Megatron-interleaved ("hf2mg")."""
    fused = RENAME if qkv_interleaved else QKV_PLAIN
    qkv = (Relation(("attention.w_qkv.weight",), (P.QKV_W,), fused) if fused_qkv else
           Relation(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"), (P.QKV_W,), QKV))
    qkv_bias = (Relation(("attention.w_qkv.bias",), (P.QKV_B,), fused, when="qkv_bias") if fused_qkv else
                Relation(("attention.wq.bias", "attention.wk.bias", "attention.wv.bias"), (P.QKV_B,), QKV, when="qkv_bias"))
    fc1 = ((Relation(("feed_forward.w_gate_hidden.weight",), (P.FC1_GATE_W, P.FC1_UP_W), FC1_INTERLEAVED),) if fused_fc1 else
           (Relation(("feed_forward.w1.weight",), (P.FC1_GATE_W,)), Relation(("feed_forward.w3.weight",), (P.FC1_UP_W,))))
    layer = Section(None, "model.layers.{layer}.", (
        Relation(("attention_norm.weight",), (P.INPUT_NORM_W,)),
        qkv, qkv_bias,
        Relation(("attention.wo.weight",), (P.DENSE_W,)),
        Relation(("ffn_norm.weight",), (P.POST_NORM_W,)),
        *fc1,
        Relation(("feed_forward.w2.weight",), (P.FC2_W,)),
    ))
    return (
        Section(P.EMBEDDINGS, "", (Relation(("model.tok_embeddings.embedding_weight",), (P.WORD_EMB,)),)),
        layer,
        Section(P.FINAL_NORM, "", (Relation(("model.norm_out.weight",), ("weight",)),)),
        Section(P.OUTPUT_LAYER, "", (Relation(("lm_head.weight",), ("weight",)),), when="output_layer"),
    )


# Entries MindSpore saves besides weights (REFERENCE §5): skipped and counted, never converted.
NON_WEIGHT_NAMES = {"epoch_num", "step_num", "global_step", "loss_scale", "scale_sense", "learning_rate",
                    "current_iterator_step", "last_overflow_iterator_step"}
NON_WEIGHT_PREFIXES = ("adam_m.", "adam_v.", "exp_avg", "accu_grads.", "moments.", "global_step")
NON_WEIGHT_SUFFIXES = ("router.expert_load", "router.fi_accu", "num_tokens_per_expert", "expert_load_history", "expert_mapping")


def is_non_weight(name: str) -> bool:
    return name in NON_WEIGHT_NAMES or name.startswith(NON_WEIGHT_PREFIXES) or name.endswith(NON_WEIGHT_SUFFIXES)
