"""Megatron-LM's `args` <-> protocol metadata: the Megatron "family's" config translation, both ways.

`megatron_args` writes what the saver records in every rank file (enough for Megatron-LM's
`--use-checkpoint-args` and for loaders); `metadata_from_args` reads a checkpoint's `args` back,
Megatron's defaults for what it lacks. MLA's RoPE/YaRN fields go through `rope_scaling`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..errors import ConversionError
from ..transport import protocol as P
from . import rope_scaling

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
MOE_FIELDS = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk", "moe_router_num_groups",
              "moe_router_group_topk", "moe_router_topk_scaling_factor", "moe_router_score_function",
              "moe_router_enable_expert_bias", "moe_router_pre_softmax")


def megatron_args(md: argparse.Namespace, *, tp: int, pp: int, ep: int, padded_vocab_size: int | None,
                  transformer_impl: str, params_dtype: torch.dtype, layout: Any, num_layer_list: list[int] | None,
                  layers_per_virtual_stage: int | None, schedules_method: str | None, naming: str = "megatron-core",
                  moe_grouped_gemm: bool = False, moe_tp_extend_ep: bool = False,
                  mla_mm_split: bool = False) -> argparse.Namespace:
    """A complete `args` Namespace, enough for Megatron-LM's `--use-checkpoint-args` and loaders."""
    chunks = layout.num_chunks if layout.num_chunks > 1 else None
    mla = bool(getattr(md, "multi_latent_attention", False))
    num_experts = md.num_experts or None
    args = argparse.Namespace(
        num_layers=layout.num_layers,
        hidden_size=md.hidden_size,
        ffn_hidden_size=md.ffn_hidden_size,
        num_attention_heads=md.num_attention_heads,
        num_query_groups=md.num_query_groups,
        group_query_attention=md.num_query_groups != md.num_attention_heads,
        kv_channels=md.kv_channels,
        max_position_embeddings=md.max_position_embeddings,
        seq_length=md.seq_length,
        position_embedding_type=md.position_embedding_type,
        use_rotary_position_embeddings=md.position_embedding_type == "rope",
        add_position_embedding=md.position_embedding_type == "learned_absolute",
        rotary_base=md.rotary_base,
        rotary_percent=getattr(md, "rotary_percent", 1.0),
        rotary_interleaved=False,
        normalization=md.normalization,
        norm_epsilon=md.norm_epsilon,
        swiglu=md.swiglu,
        squared_relu=False,
        apply_layernorm_1p=False,
        add_bias_linear=md.linear_bias,
        add_qkv_bias=md.qkv_bias,
        qk_layernorm=bool(getattr(md, "qk_layernorm", False)) or mla,
        untie_embeddings_and_output_weights=md.output_layer,
        padded_vocab_size=padded_vocab_size,
        vocab_size=getattr(md, "vocab_size", None),
        true_vocab_size=md.true_vocab_size,
        make_vocab_size_divisible_by=md.make_vocab_size_divisible_by,
        tokenizer_type=md.tokenizer_type,
        params_dtype=params_dtype,
        fp16=params_dtype == torch.float16,
        bf16=params_dtype == torch.bfloat16,
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
        sequence_parallel=bool(num_experts) and tp > 1,
        apply_query_key_layer_scaling=False,
        num_experts=num_experts,
        transformer_impl=transformer_impl,
        use_mcore_models=True,
        use_legacy_models=False,
        ckpt_format="torch",
        iteration=md.iteration,
        consumed_train_samples=getattr(md, "consumed_train_samples", 0),
        consumed_valid_samples=getattr(md, "consumed_valid_samples", 0),
        hf_config=getattr(md, "hf_config", None),
        multi_latent_attention=mla,
        mtp_num_layers=getattr(md, "mtp_num_layers", None) or None,
    )
    if mla:
        for field in MLA_FIELDS:
            setattr(args, field, getattr(md, field))
        rope_scaling.write_args(args, md, naming)
    if num_experts:
        first_k = getattr(md, "first_k_dense_replace", 0)
        args.moe_layer_freq = [0 if i < first_k else 1 for i in range(md.num_layers)]
        args.first_k_dense_replace = first_k
        for field in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk",
                      "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
                      "moe_router_score_function", "moe_router_enable_expert_bias"):
            setattr(args, field, getattr(md, field, None))
        args.moe_router_pre_softmax = bool(getattr(md, "moe_router_pre_softmax", False))
        args.moe_router_dtype = "fp32"
        args.moe_grouped_gemm = moe_grouped_gemm
        args.moe_tp_extend_ep = moe_tp_extend_ep
        args.moe_token_dispatcher_type = "alltoall"
    if getattr(md, "hf_model_type", None):  # only where a loader recorded it (see protocol)
        args.hf_model_type = md.hf_model_type
    args.naming = naming
    args.mla_mm_split = mla_mm_split
    return args


def metadata_from_args(a: argparse.Namespace, source_sizes: tuple[int, int], iteration: int | str, word: torch.Tensor,
                       true_vocab_size: int | None) -> argparse.Namespace:
    """Protocol metadata from a checkpoint's `args`; missing optional fields get Megatron defaults."""
    def need(name: str) -> Any:
        if not hasattr(a, name):
            raise ConversionError(f"checkpoint args lack '{name}'")
        return getattr(a, name)

    heads = need("num_attention_heads")
    mla = bool(getattr(a, "multi_latent_attention", False))
    groups = getattr(a, "num_query_groups", None) if getattr(a, "group_query_attention", False) else heads
    params_dtype = getattr(a, "params_dtype", None) or word.dtype
    md = P.make_metadata(
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
        num_experts=getattr(a, "num_experts", None),
        previous_tensor_parallel_size=source_sizes[0],
        previous_pipeline_parallel_size=source_sizes[1],
        consumed_train_samples=getattr(a, "consumed_train_samples", 0),
        consumed_valid_samples=getattr(a, "consumed_valid_samples", 0),
        normalization=getattr(a, "normalization", "LayerNorm"),
        norm_epsilon=getattr(a, "norm_epsilon", 1e-5),
        rotary_base=getattr(a, "rotary_base", 10000),
        qk_layernorm=bool(getattr(a, "qk_layernorm", False)) and not mla,
        hf_config=getattr(a, "hf_config", None),
    )
    md.mtp_num_layers = getattr(a, "mtp_num_layers", None) or 0
    md.rotary_percent = getattr(a, "rotary_percent", None) or 1.0
    md.hf_model_type = getattr(a, "hf_model_type", None)
    if mla:
        md.multi_latent_attention = True
        for field in MLA_FIELDS:
            setattr(md, field, need(field))
        md.rope_scaling = rope_scaling.from_args(a)
    if md.num_experts:
        freq = getattr(a, "moe_layer_freq", None)
        md.first_k_dense_replace = getattr(a, "first_k_dense_replace", None)
        if md.first_k_dense_replace is None:
            md.first_k_dense_replace = freq.index(1) if isinstance(freq, list) and 1 in freq else 0
        for field in MOE_FIELDS:
            setattr(md, field, getattr(a, field, None))
    return P.normalize_metadata(md)
