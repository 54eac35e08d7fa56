"""Megatron-LM's `args` <-> model spec: the Megatron "family's" config translation, both ways.

`megatron_args` writes what the saver records in every rank file (enough for Megatron-LM's
`--use-checkpoint-args` and for loaders); `metadata_from_args` reads a checkpoint's `args` back into a spec,
Megatron's defaults for what it lacks. MLA's RoPE/YaRN fields go through `rope_scaling`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from ..transport.protocol import MLA_FIELDS
from ..transport.spec import MLASpec, ModelSpec, MoESpec
from . import rope_scaling

# MoESpec fields recorded as `moe_<field>` in field order; the others are written apart.
MOE_ARGS = tuple(field for field in P.MOE_FIELDS
                 if field not in ("num_experts", "first_k_dense_replace", "router_pre_softmax", "shared_expert_gate"))


def megatron_args(md: ModelSpec, *, tp: int, pp: int, ep: int, padded_vocab_size: int | None,
                  transformer_impl: str, params_dtype: torch.dtype, layout: Any, num_layer_list: list[int] | None,
                  layers_per_virtual_stage: int | None, schedules_method: str | None, naming: str = "megatron-core",
                  moe_grouped_gemm: bool = False, moe_tp_extend_ep: bool = False,
                  mla_mm_split: bool = False) -> argparse.Namespace:
    """A complete `args` Namespace, enough for Megatron-LM's `--use-checkpoint-args` and loaders."""
    chunks = layout.num_chunks if layout.num_chunks > 1 else None
    moe = md.moe
    model = P.megatron_model_args(md, params_dtype, padded_vocab_size)
    model.update(num_layers=layout.num_layers, qk_layernorm=md.qk_layernorm or md.mla is not None)
    args = argparse.Namespace(
        **model,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1 if moe_tp_extend_ep else tp,
        virtual_pipeline_model_parallel_size=chunks,
        num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage,
        num_layer_list=",".join(map(str, num_layer_list)) if num_layer_list else None,
        noop_layers=",".join(map(str, sorted(layout.noop))) if layout.noop else None,
        schedules_method=schedules_method,
        data_parallel_size=1,
        world_size=tp * pp * ep,
        sequence_parallel=moe is not None and tp > 1,
        apply_query_key_layer_scaling=False,
        num_experts=moe.num_experts if moe else None,
        transformer_impl=transformer_impl,
        use_mcore_models=True,
        use_legacy_models=False,
        ckpt_format="torch",
        iteration=md.iteration,
        consumed_train_samples=md.consumed_train_samples,
        consumed_valid_samples=md.consumed_valid_samples,
        hf_config=md.hf_config,
        multi_latent_attention=md.mla is not None,
        mtp_num_layers=md.mtp_num_layers or None,
    )
    if md.mla:
        vars(args).update(dataclasses.asdict(md.mla))
        rope_scaling.write_args(args, md, naming)
    if moe:
        first_k = moe.first_k_dense_replace
        args.moe_layer_freq = [0 if i < first_k else 1 for i in range(md.num_layers)]
        args.first_k_dense_replace = first_k
        for field in MOE_ARGS:
            setattr(args, "moe_" + field, getattr(moe, field))
        args.moe_router_pre_softmax = bool(moe.router_pre_softmax)
        if moe.shared_expert_gate:  # Qwen2-MoE; absent is megatron-core's default, False
            args.moe_shared_expert_gate = True
        args.moe_router_dtype = "fp32"
        args.moe_grouped_gemm = moe_grouped_gemm
        args.moe_tp_extend_ep = moe_tp_extend_ep
        args.moe_token_dispatcher_type = "alltoall"
    if md.hf_model_type:  # only where a loader recorded it (see protocol)
        args.hf_model_type = md.hf_model_type
    args.naming = naming
    args.mla_mm_split = mla_mm_split
    return args


def metadata_from_args(a: argparse.Namespace, source_sizes: tuple[int, int], iteration: int | str, word: torch.Tensor,
                       true_vocab_size: int | None) -> ModelSpec:
    """The model spec of a checkpoint's `args`; missing optional fields get Megatron defaults."""
    def need(name: str) -> Any:
        if not hasattr(a, name):
            raise ConversionError(f"checkpoint args lack '{name}'")
        return getattr(a, name)

    heads = need("num_attention_heads")
    mla = bool(getattr(a, "multi_latent_attention", False))
    groups = getattr(a, "num_query_groups", None) if getattr(a, "group_query_attention", False) else heads
    params_dtype = getattr(a, "params_dtype", None) or word.dtype
    num_experts = getattr(a, "num_experts", None)
    moe = None
    if num_experts:
        freq = getattr(a, "moe_layer_freq", None)
        first_k = getattr(a, "first_k_dense_replace", None)
        if first_k is None:
            first_k = freq.index(1) if isinstance(freq, list) and 1 in freq else 0
        given = {field: getattr(a, "moe_" + field) for field in MOE_ARGS[2:] if getattr(a, "moe_" + field, None) is not None}
        moe = MoESpec(num_experts=num_experts, first_k_dense_replace=first_k, ffn_hidden_size=need("moe_ffn_hidden_size"),
                      shared_expert_intermediate_size=getattr(a, "moe_shared_expert_intermediate_size", None),
                      **given, router_pre_softmax=getattr(a, "moe_router_pre_softmax", None),
                      shared_expert_gate=bool(getattr(a, "moe_shared_expert_gate", False)))
    return ModelSpec(
        model_type="GPT",
        num_layers=need("num_layers"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=getattr(a, "ffn_hidden_size", None) or 4 * a.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups or heads,
        kv_channels=getattr(a, "kv_channels", None) or a.hidden_size // heads,
        seq_length=getattr(a, "seq_length", None),
        max_position_embeddings=getattr(a, "max_position_embeddings", None),
        tokenizer_type=getattr(a, "tokenizer_type", None),
        iteration=iteration,
        params_dtype=params_dtype,
        bert_binary_head=False,
        output_layer=bool(getattr(a, "untie_embeddings_and_output_weights", False)),
        position_embedding_type=getattr(a, "position_embedding_type", "learned_absolute"),
        linear_bias=bool(getattr(a, "add_bias_linear", True)),
        qkv_bias=bool(getattr(a, "add_qkv_bias", False)) or bool(getattr(a, "add_bias_linear", True)),
        norm_has_bias=getattr(a, "normalization", "LayerNorm") == "LayerNorm",
        swiglu=bool(getattr(a, "swiglu", False)),
        true_vocab_size=true_vocab_size or getattr(a, "true_vocab_size", None),
        vocab_size=getattr(a, "vocab_size", None),
        make_vocab_size_divisible_by=getattr(a, "make_vocab_size_divisible_by", 128),
        previous_tensor_parallel_size=source_sizes[0],
        previous_pipeline_parallel_size=source_sizes[1],
        consumed_train_samples=getattr(a, "consumed_train_samples", 0),
        consumed_valid_samples=getattr(a, "consumed_valid_samples", 0),
        normalization=getattr(a, "normalization", "LayerNorm"),
        norm_epsilon=getattr(a, "norm_epsilon", 1e-5),
        rotary_base=getattr(a, "rotary_base", 10000),
        qk_layernorm=bool(getattr(a, "qk_layernorm", False)) and not mla,
        hf_config=getattr(a, "hf_config", None),
        hf_model_type=getattr(a, "hf_model_type", None),
        rotary_percent=getattr(a, "rotary_percent", None) or 1.0,
        mtp_num_layers=getattr(a, "mtp_num_layers", None) or 0,
        mla=MLASpec(**{field: need(field) for field in MLA_FIELDS}) if mla else None,
        moe=moe,
        rope_scaling=rope_scaling.from_args(a) if mla else None,
    )
