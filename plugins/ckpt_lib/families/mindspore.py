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

MoE models (DeepSeek-V3, Qwen3-MoE), as mindformers 1.9.0's training model holds them (its parameter
names and shapes were compared with the fixtures, see tests/fixtures/make_mindspore_fixtures.py):
- Routed experts are grouped (`moe_grouped_gemm: True`; get_moe_module_spec raises for False):
  `mlp.experts.weight1` [E*H, 2F] and `weight2` [E*F, H] (moe/ffn.py FFNGroupedGEMM, reshaped there to
  [E, H, 2F] / [E, F, H]). Expert e's rows of weight1 are [gate^T | up^T]: the converter
  (TrainModelMixin.concat_expert_weight after concat_ffn_weight_infer, and ExpertsConvertOp) stacks
  [gate; up] per expert and transposes, and the Swiglu of experts_forward splits the 2F columns in
  halves. `use_interleaved_weight_layout_mlp` does not apply to them; it does apply to dense
  `mlp.linear_fc1` and `mlp.shared_experts.linear_fc1` (SharedExpertMLPInterleaved).
- `mlp.router.weight` [E, H]; `mlp.router.expert_bias` [E] fp32 when `moe_router_enable_expert_bias`
  (DeepSeek-V3); `router.expert_load` and `router.fi_accu` are load-balancing state, not weights.
- MLA with `mla_qkv_concat: True` (the spec default; MLASelfAttentionConcatenated):
  `self_attention.linear_qkv` = [q_down; kv_down] rows split as [q_lora_rank, kv_lora_rank, rope],
  `linear_qb` (q up), `linear_kvb` (kv up), `q_layernorm` (q latent norm), `k_layernorm` (kv latent
  norm); with False (MLASelfAttention) Megatron's `linear_q_down_proj`, `linear_q_up_proj`,
  `linear_kv_down_proj`, `linear_kv_up_proj`, `q_layernorm`, `kv_layernorm`. RoPE rows are not
  permuted (rotary de-interleaving happens at run time, as in Megatron and HF).
- MTP (`mtp_num_layers`): `mtp.layers.K.{enorm,hnorm,eh_proj,final_layernorm}` and
  `mtp.layers.K.transformer_layer.*`; eh_proj's input is cat[enorm(embedding), hnorm(hidden)]; no
  embedding or head copies. (DeepseekV3PreTrainedModel.weight_mapping's `decoder.enorm` names are
  stale: the training model has no such parameters.)
- Dense layers (DeepSeek-V3's first `first_k_dense_replace`) use the dense MLP names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import ConversionError
from ..layout.sharding import materialize
from ..transport import protocol as P
from . import QKV, RENAME, Op, Relation, Section, Tensors, concat, stack


def _deinterleave_rows(tensors: Tensors, md: Any) -> Tensors:
    (fused,) = tensors
    return fused[0::2], fused[1::2]


def _interleave_rows(tensors: Tensors, md: Any) -> Tensors:
    gate, up = tensors
    return (stack([gate, up], dim=1).reshape(-1, *gate.shape[1:]),)


def _split_halves(tensors: Tensors, md: Any) -> Tensors:
    return tuple(torch.chunk(tensors[0], 2, dim=0))


def _join_halves(tensors: Tensors, md: Any) -> Tensors:
    return (concat(tensors, dim=0),)


def _plain_to_interleaved_qkv(tensors: Tensors, md: Any) -> Tensors:
    (plain,) = tensors
    q_rows, kv_rows = md.num_attention_heads * md.kv_channels, md.num_query_groups * md.kv_channels
    return QKV.forward(tuple(torch.split(plain, [q_rows, kv_rows, kv_rows], dim=0)), md)


def _interleaved_to_plain_qkv(tensors: Tensors, md: Any) -> Tensors:
    return (concat([materialize(t) for t in QKV.backward(tensors, md)], dim=0),)


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


def _split_mla_down(tensors: Tensors, md: Any) -> Tensors:
    (fused,) = tensors
    mla = md.mla
    rows = mla.q_lora_rank + mla.kv_lora_rank + mla.qk_pos_emb_head_dim
    if fused.shape[0] != rows:
        raise ConversionError(f"MLA linear_qkv has {fused.shape[0]} rows, expected q_lora_rank + kv_lora_rank + rope dim = {rows}")
    return tuple(torch.split(fused, [mla.q_lora_rank, mla.kv_lora_rank + mla.qk_pos_emb_head_dim], dim=0))


MLA_DOWN_CONCAT = Op("mla-qkv-concat", _split_mla_down, _join_halves)
MLA_CONCAT = (
    Relation(("self_attention.linear_qkv.weight",), (P.Q_DOWN_W, P.KV_DOWN_W), MLA_DOWN_CONCAT),
    Relation(("self_attention.q_layernorm.weight",), (P.Q_DOWN_NORM_W,)),
    Relation(("self_attention.linear_qb.weight",), (P.Q_UP_W,)),
    Relation(("self_attention.k_layernorm.weight",), (P.KV_DOWN_NORM_W,)),
    Relation(("self_attention.linear_kvb.weight",), (P.KV_UP_W,)),
)
MLA_SPLIT = (
    Relation(("self_attention.linear_q_down_proj.weight",), (P.Q_DOWN_W,)),
    Relation(("self_attention.q_layernorm.weight",), (P.Q_DOWN_NORM_W,)),
    Relation(("self_attention.linear_q_up_proj.weight",), (P.Q_UP_W,)),
    Relation(("self_attention.linear_kv_down_proj.weight",), (P.KV_DOWN_W,)),
    Relation(("self_attention.kv_layernorm.weight",), (P.KV_DOWN_NORM_W,)),
    Relation(("self_attention.linear_kv_up_proj.weight",), (P.KV_UP_W,)),
)
MTP_EXTRA = (
    Relation(("enorm.weight",), (P.MTP_ENORM_W,)),
    Relation(("hnorm.weight",), (P.MTP_HNORM_W,)),
    Relation(("eh_proj.weight",), (P.MTP_EH_PROJ_W,)),
    Relation(("final_layernorm.weight",), (P.MTP_NORM_W,)),
)
# One routed expert of the grouped tensors, named as `GroupedExperts` (ms_loader) serves them.
EXPERT_FC1_GATE, EXPERT_FC1_UP, EXPERT_FC2 = "mlp.experts.weight1[{expert}].gate", "mlp.experts.weight1[{expert}].up", "mlp.experts.weight2[{expert}]"
GROUPED_FC1, GROUPED_FC2 = "mlp.experts.weight1", "mlp.experts.weight2"


# Grouped tensor -> the per-expert names it serves.
GROUPED = {GROUPED_FC1: (EXPERT_FC1_GATE, EXPERT_FC1_UP), GROUPED_FC2: (EXPERT_FC2,)}


def expert_part(block: torch.Tensor, part: str) -> torch.Tensor:
    """Expert e's rows of weight1 ([H, 2F] = [gate^T | up^T]) or of weight2 ([F, H]) -> protocol [out, in]."""
    if part == EXPERT_FC1_GATE:
        return block[:, : block.shape[1] // 2].t()
    if part == EXPERT_FC1_UP:
        return block[:, block.shape[1] // 2:].t()
    return block.t()


class MoeTables(NamedTuple):
    """The sections of a mindformers MoE model: `dense` (embedding, dense layer, final norm, output),
    `moe_layer`, `experts` (of a decoder layer), and per MTP layer its message and its experts."""

    dense: tuple[Section, Section, Section, Section]
    moe_layer: Section
    experts: Section
    mtp: tuple[Section, ...]
    mtp_experts: tuple[Section, ...]


def moe_sections(qkv_interleaved: bool, fc1_interleaved: bool, mla: bool, mla_concat: bool, mtp_layers: int) -> MoeTables:
    """Tables for mindformers' MoE models (GQA or MLA attention, shared by dense, MoE and MTP layers)."""
    dense = mcore_sections(qkv_interleaved, fc1_interleaved)
    fc1 = FC1_INTERLEAVED if fc1_interleaved else FC1_CONTIGUOUS
    if mla:
        attention = (Relation(("input_layernorm.weight",), (P.INPUT_NORM_W,)), *(MLA_CONCAT if mla_concat else MLA_SPLIT),
                     Relation(("self_attention.linear_proj.weight",), (P.DENSE_W,)),
                     Relation(("pre_mlp_layernorm.weight",), (P.POST_NORM_W,)))
    else:
        attention = tuple(r for r in dense[1].relations if not r.source[0].startswith("mlp."))
    dense_mlp = tuple(r for r in dense[1].relations if r.source[0].startswith("mlp."))
    moe = (
        Relation(("mlp.router.weight",), (P.ROUTER_W,)),
        Relation(("mlp.router.expert_bias",), (P.ROUTER_BIAS,), when="moe.router_enable_expert_bias"),
        Relation(("mlp.shared_experts.linear_fc1.weight",), (P.SHARED_FC1_GATE_W, P.SHARED_FC1_UP_W), fc1,
                 when="moe.shared_expert_intermediate_size"),
        Relation(("mlp.shared_experts.linear_fc2.weight",), (P.SHARED_FC2_W,), when="moe.shared_expert_intermediate_size"),
    )
    experts = (Relation((EXPERT_FC1_GATE,), (P.FC1_GATE_W,)), Relation((EXPERT_FC1_UP,), (P.FC1_UP_W,)),
               Relation((EXPERT_FC2,), (P.FC2_W,)))
    mtp_layer = MTP_EXTRA + tuple(Relation(tuple("transformer_layer." + s for s in r.source), r.keys, r.op, r.when)
                                  for r in attention + moe)
    prefixes = [f"mtp.layers.{k}." for k in range(mtp_layers)]
    return MoeTables(
        dense=(dense[0], Section(None, "decoder.layers.{layer}.", attention + dense_mlp), dense[2], dense[3]),
        moe_layer=Section(None, "decoder.layers.{layer}.", attention + moe),
        experts=Section(None, "decoder.layers.{layer}.", experts),
        mtp=tuple(Section(None, m, mtp_layer) for m in prefixes),
        mtp_experts=tuple(Section(None, m + "transformer_layer.", experts) for m in prefixes),
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
