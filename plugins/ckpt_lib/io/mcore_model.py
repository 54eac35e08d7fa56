"""megatron-core GPTModels built from a checkpoint's `args`, as Megatron-LM builds them, on CPU.

Run-time code needs it where megatron-core owns the format: torch_dist (the sharded state dict of a
meta model) and the distributed optimizer's buffer layout; the verification runner (`ckpt_verify`)
builds the same models to run them. Needs megatron-core (the `megatron` extra). Tested with 0.16.1,
0.12.1 and 0.19.2; where the releases' GPTModel, spec and config arguments differ, the code asks the
release (signatures, config fields), not its version. `on_cpu` is the reversible CPU shim.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from ..layout.pipeline import parse_layer_list


def stage_layout(args: argparse.Namespace) -> list[list[int]]:
    """Layers per (virtual) stage in forward order, noop layers counted (MindSpeed-LLM's numbering)."""
    pp, n = args.pipeline_model_parallel_size, args.num_layers
    if getattr(args, "num_layer_list", None):
        return [[int(c)] for c in args.num_layer_list.split(",")]
    per_chunk = getattr(args, "num_layers_per_virtual_pipeline_stage", None) or n // pp
    if dualpipev(args):
        per_chunk = n // (2 * pp)
    return [[per_chunk] for _ in range(n // per_chunk)]


def dualpipev(args: argparse.Namespace) -> bool:
    """DualPipeV: two mirrored chunks per pipeline rank (MindSpeed-LLM)."""
    return getattr(args, "schedules_method", None) == "dualpipev"


def stage_placement(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(pipeline rank, chunk) holding each stage in forward order: megatron's stage v * PP + p, or under
    dualpipev rank p's first chunk for stage p and its second chunk for stage 2 * PP - 1 - p."""
    pp, count = args.pipeline_model_parallel_size, len(stage_layout(args))
    if dualpipev(args):
        return [(s, 0) if s < pp else (2 * pp - 1 - s, 1) for s in range(count)]
    return [(s % pp, s // pp) for s in range(count)]


class NoopLayer(torch.nn.Module):
    """MindSpeed-LLM's noop layer (`--noop-layers`): a placeholder without weights that passes the
    hidden states through; it takes its slot in a real megatron-core TransformerBlock."""

    def __init__(self, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, context: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        return hidden_states, context


def noop_layers(args: argparse.Namespace) -> set[int]:
    """MindSpeed-LLM's `--noop-layers`, in the padded numbering."""
    return set(parse_layer_list(getattr(args, "noop_layers", None)) or ())


def _padded_moe_layer_freq(args: argparse.Namespace) -> Any:
    """`moe_layer_freq` over the padded numbering megatron-core builds (noop slots become MoE, then noop)."""
    noop, freq = noop_layers(args), args.moe_layer_freq
    if not noop or not isinstance(freq, list):
        return freq
    real = iter(freq)
    return [1 if i in noop else next(real) for i in range(args.num_layers)]


class _CpuRngTracker:
    """Stands in for megatron's CUDA RNG tracker; dropout is 0 in these forwards."""

    def fork(self, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext()


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """megatron-core's CUDA assumptions answered on the CPU while the block runs, undone after:
    `torch.cuda.current_device` yields the CPU, `Tensor.cuda` is a no-op (tied embeddings under PP call
    it), `torch.cuda.synchronize` too (dist_checkpointing calls it unconditionally), the CUDA RNG tracker
    is a no-op (no dropout here), and `moe_utils.te_general_gemm` is None where Transformer Engine is
    absent (referenced unguarded). The models are the real megatron-core classes."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    tracker = _CpuRngTracker()
    patches: list[tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", lambda: torch.device("cpu")), (torch.cuda, "is_available", lambda: False),
        (torch.cuda, "synchronize", lambda *a, **k: None), (torch.Tensor, "cuda", lambda self, *a, **k: self),
        (tensor_parallel, "get_cuda_rng_tracker", lambda *a, **k: tracker),
        (tp_random, "get_cuda_rng_tracker", lambda *a, **k: tracker),
    ]
    if not hasattr(moe_utils, "te_general_gemm"):
        patches.append((moe_utils, "te_general_gemm", None))
    saved = [(obj, name, obj.__dict__.get(name, _ABSENT)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_ABSENT = object()


def transformer_config(args: argparse.Namespace, layout: list[list[str]] | None) -> Any:
    """The TransformerConfig (MLATransformerConfig for MLA) Megatron-LM builds from a checkpoint's `args`,
    fp32 and CPU-friendly (no fusions, no dropout); `layout` from `layout_names` where the release takes it."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    extra: dict[str, Any] = {}
    cls = TransformerConfig
    if getattr(args, "multi_latent_attention", False):
        cls = MLATransformerConfig
        extra.update(multi_latent_attention=True, q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank,
                     qk_head_dim=args.qk_head_dim, qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim,
                     rotary_base=args.rotary_base, **_mla_rope(args, cls))
    if getattr(args, "num_experts", None):
        extra.update(num_moe_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                     moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
                     moe_layer_freq=_padded_moe_layer_freq(args), moe_router_topk=args.moe_router_topk,
                     moe_router_num_groups=args.moe_router_num_groups, moe_router_group_topk=args.moe_router_group_topk,
                     moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
                     moe_router_score_function=args.moe_router_score_function, moe_router_enable_expert_bias=bool(args.moe_router_enable_expert_bias),
                     moe_router_dtype="fp32", moe_token_dispatcher_type="allgather",
                     expert_model_parallel_size=args.expert_model_parallel_size, moe_aux_loss_coeff=0.0,
                     sequence_parallel=False)  # the local spec's torch norms cannot run sequence-parallel
        if "moe_router_pre_softmax" in config_fields(cls):  # Qwen3-MoE norm_topk_prob false: softmax over all, then top k
            extra["moe_router_pre_softmax"] = bool(getattr(args, "moe_router_pre_softmax", False))
    if getattr(args, "mtp_num_layers", None):
        # The loss scale only weighs the MTP loss (not the logits); 0.12's config has no default for it.
        scale = getattr(args, "mtp_loss_scaling_factor", None)
        extra.update(mtp_num_layers=args.mtp_num_layers, mtp_loss_scaling_factor=0.1 if scale is None else scale)
    return cls(**extra, **_pipeline_split(cls, args, layout),
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu, add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        params_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        pipeline_dtype=torch.float32,
    )


def config_fields(cls: Any) -> dict[str, Any]:
    """This release's config fields: the code asks the release what it takes, not its version."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _mla_rope(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """MLA's RoPE/YaRN config from the checkpoint's args, as Megatron-LM builds it (every args attribute
    named like a config field; a missing `rope_type` leaves MLATransformerConfig's default, yarn), with the
    flags the saver prints for the training command. Without them in args: Megatron-LM's argument defaults
    (`--rotary-scaling-factor` 1, `--mscale` 1, `--mscale-all-dim` 1.0 in core_r0.12.0 / 0.0 in core_r0.19.0,
    whichever this release's MLATransformerConfig defaults to), never the config's DeepSeek-V3 defaults
    (factor 40). YaRN's original length is `original_max_position_embeddings` from 0.16 on and
    `max_position_embeddings` in 0.12 (which core_r0.12 fills from --max-position-embeddings: the saver
    prints that flag with the original length for such targets)."""
    fields = config_fields(cls)
    default_all_dim = fields["mscale_all_dim"].default

    def arg(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    out: dict[str, Any] = {"rotary_scaling_factor": float(arg("rotary_scaling_factor", 1.0)), "mscale": float(arg("mscale", 1.0)),
                           "mscale_all_dim": float(arg("mscale_all_dim", 0.0 if default_all_dim == 0.0 else 1.0))}
    if getattr(args, "rope_type", None) is not None:
        out["rope_type"] = args.rope_type
    for name in ("beta_fast", "beta_slow"):
        if name in fields and getattr(args, name, None) is not None:
            out[name] = float(getattr(args, name))
    original = getattr(args, "original_max_position_embeddings", None)
    if "original_max_position_embeddings" in fields:
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
    elif "max_position_embeddings" in fields:
        out["max_position_embeddings"] = int(original if original is not None else args.max_position_embeddings)
    return out


def _pipeline_split(cls: Any, args: argparse.Namespace, layout: list[list[str]] | None) -> dict[str, Any]:
    """How the layers are split over pipeline stages: `pipeline_model_parallel_layout` where the config
    has it (0.16, 0.19); without it (0.12) even splits (VPP included) need nothing, and a first and/or
    last stage of their own size are `num_layers_in_first/last_pipeline_stage`."""
    fields = config_fields(cls)
    if "pipeline_model_parallel_layout" in fields:
        return {"pipeline_model_parallel_layout": layout}
    sizes = [c for (c,) in stage_layout(args)]
    if len(set(sizes)) == 1:
        return {}
    pp = args.pipeline_model_parallel_size
    if len(sizes) == pp and len(set(sizes[1:-1])) <= 1 and "num_layers_in_first_pipeline_stage" in fields:
        if pp == 2:  # the last stage gets the rest (0.12 divides by zero middle stages when both are given)
            return {"num_layers_in_first_pipeline_stage": sizes[0]}
        return {k: v for k, v in (("num_layers_in_first_pipeline_stage", sizes[0]), ("num_layers_in_last_pipeline_stage", sizes[-1]))
                if v != sizes[1]}
    raise NotImplementedError(f"layers per stage {sizes} need a megatron-core with pipeline_model_parallel_layout")


def layout_names(args: argparse.Namespace) -> list[list[str]]:
    """`pipeline_model_parallel_layout`: the modules of each (virtual) stage in forward order."""
    stages = stage_layout(args)
    out = [["decoder"] * c for (c,) in stages]
    out[0].insert(0, "embedding")
    out[-1] += ["mtp"] * (getattr(args, "mtp_num_layers", None) or 0) + ["loss"]
    return out


def _local_spec(config: Any, args: argparse.Namespace, vp_stage: int | None) -> Any:
    """The local spec; for MLA, megatron-core's local DotProductAttention rejects the k/v channel
    arguments MLA passes (upstream issue #1589) and sizes its output by kv_channels, so a subclass
    that accepts them and sizes the context by v_head_dim is used."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    if not getattr(args, "multi_latent_attention", False) and not getattr(args, "num_experts", None):
        return get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm)
    import megatron.core.transformer.multi_latent_attention as mla
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    mla.HAVE_TE = False  # megatron-core sets it although Transformer Engine is absent

    class MlaDotProductAttention(DotProductAttention):
        def __init__(self, *a: Any, k_channels: Any = None, v_channels: Any = None, **k: Any) -> None:
            super().__init__(*a, **k)
            if v_channels is not None:  # the context has v_head_dim per head, not kv_channels
                self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels

    spec = call_with(get_gpt_decoder_block_spec, config, use_transformer_engine=False, optional={"vp_stage": vp_stage})
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = MlaDotProductAttention
    return spec


def build_model(args: argparse.Namespace, config: Any, stage: int, num_stages: int, vp_stage: int | None,
                parallel_output: bool = False, pg_collection: Any = None) -> Any:
    """The GPTModel (chunk) of one pipeline stage, as Megatron-LM builds it from `args` (full-vocabulary
    logits unless `parallel_output`, which training needs: the loss edits the logits in place).
    Releases whose GPTModel takes no `vp_stage` (0.12) read the chunk from parallel_state."""
    from megatron.core.models.gpt import GPTModel

    takes = inspect.signature(GPTModel.__init__).parameters
    if pg_collection is not None and "pg_collection" not in takes:
        raise NotImplementedError("this megatron-core's GPTModel takes no process groups (needed for dualpipev)")
    with contextlib.nullcontext() if "vp_stage" in takes else _as_virtual_stage(vp_stage):
        spec = _local_spec(config, args, vp_stage)
        last = stage == num_stages - 1
        mtp_spec = None
        if last and getattr(args, "mtp_num_layers", None):
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

            mtp_spec = call_with(get_gpt_mtp_block_spec, config, spec.layer_specs[-1], use_transformer_engine=False,
                             optional={"vp_stage": vp_stage})
        return call_with(GPTModel, config, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     pre_process=stage == 0, post_process=last,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     position_embedding_type="rope", rotary_base=args.rotary_base, rotary_percent=getattr(args, "rotary_percent", 1.0),
                     parallel_output=parallel_output,
                     mtp_block_spec=mtp_spec, optional={"vp_stage": vp_stage, "pg_collection": pg_collection})


def call_with(fn: Any, *args: Any, optional: dict[str, Any], **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` plus those `optional` arguments this megatron-core release's `fn` takes."""
    params = inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters
    return fn(*args, **kwargs, **{k: v for k, v in optional.items() if k in params})


@contextlib.contextmanager
def _as_virtual_stage(vp_stage: int | None) -> Any:
    """parallel_state's virtual pipeline rank set to `vp_stage` while a chunk is built (releases that
    take no `vp_stage` argument number the chunk's layers from it)."""
    from megatron.core import parallel_state as ps

    if vp_stage is None:
        yield
        return
    with rank_set(ps.get_virtual_pipeline_model_parallel_rank, ps.set_virtual_pipeline_model_parallel_rank, vp_stage):
        yield


@contextlib.contextmanager
def rank_set(get: Any, set_: Any, rank: int) -> Any:
    """A parallel_state rank set to `rank` for the block, the previous one restored after."""
    own = get()
    set_(rank)
    try:
        yield
    finally:
        set_(own)
