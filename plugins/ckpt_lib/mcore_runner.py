"""Load a converted legacy checkpoint into real megatron-core GPTModels on CPU and run it (the proof
in the tests, and `verify.py --logits`; needs megatron-core, which conversions do not). Tested with
0.16.1 (the venv's) and 0.12.1 and 0.19.2 (tests/test_mcore_versions.py); where the releases' GPTModel,
spec and config arguments differ, the code asks the release (signatures, config fields), not its version.

One process per rank (gloo), each building the GPTModel(s) of its rank from the checkpoint's
`args`, loading its file with `strict=True` and running a forward in fp32; pipeline stages pass
hidden states with send/recv in layer order (VPP and dualpipev chunks included; noop layers are
weightless pass-through modules in their slots), and the last stage returns the full-vocabulary
logits (`parallel_output=False`).

CPU patches, applied in the worker processes only (the models are the real megatron-core
classes): `torch.cuda.current_device` yields the CPU, `Tensor.cuda` is a no-op (tied embeddings
under PP call it), the CUDA RNG tracker is a no-op (dropout is 0), `moe_utils.te_general_gemm` is
defined as None (referenced unguarded without Transformer Engine), and the causal mask is passed
explicitly (the default helper allocates on CUDA). MoE uses the allgather token dispatcher.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

from .pipeline import parse_layer_list
from .torch_dist import is_torch_dist
from .torch_dist import read_args as torch_dist_args

TRACKER = "latest_checkpointed_iteration.txt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_args(ckpt_dir: Path, layout: tuple[int, int, int] | None = None) -> tuple[argparse.Namespace, Path]:
    """The checkpoint's `args`; for torch_dist, `layout` (TP, PP, EP) picks the layout to load at."""
    text = (ckpt_dir / TRACKER).read_text().strip()
    it_dir = ckpt_dir / ("release" if text == "release" else f"iter_{int(text):07d}")
    if is_torch_dist(it_dir):
        args = torch_dist_args(it_dir)
        if layout is not None:
            args = argparse.Namespace(**vars(args))
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size = layout
            args.num_layers_per_virtual_pipeline_stage = args.num_layer_list = None
        return args, it_dir
    first = sorted(it_dir.glob("mp_rank_*/model_optim_rng.pt"))[0]
    return torch.load(first, map_location="cpu", weights_only=False)["args"], it_dir


def stage_layout(args: argparse.Namespace) -> list[list[int]]:
    """Layers per (virtual) stage in forward order, noop layers counted (MindSpeed-LLM's numbering)."""
    pp, n = args.pipeline_model_parallel_size, args.num_layers
    if getattr(args, "num_layer_list", None):
        return [[int(c)] for c in args.num_layer_list.split(",")]
    per_chunk = getattr(args, "num_layers_per_virtual_pipeline_stage", None) or n // pp
    if _dualpipev(args):
        per_chunk = n // (2 * pp)
    return [[per_chunk] for _ in range(n // per_chunk)]


def _dualpipev(args: argparse.Namespace) -> bool:
    return getattr(args, "schedules_method", None) == "dualpipev"


def stage_placement(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(pipeline rank, chunk) holding each stage in forward order: megatron's stage v * PP + p, or under
    dualpipev rank p's first chunk for stage p and its second chunk for stage 2 * PP - 1 - p."""
    pp, count = args.pipeline_model_parallel_size, len(stage_layout(args))
    if _dualpipev(args):
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


def _noop_layers(args: argparse.Namespace) -> set[int]:
    return set(parse_layer_list(getattr(args, "noop_layers", None)) or ())


def _padded_moe_layer_freq(args: argparse.Namespace) -> Any:
    """`moe_layer_freq` over the padded numbering megatron-core builds (noop slots become MoE, then noop)."""
    noop, freq = _noop_layers(args), args.moe_layer_freq
    if not noop or not isinstance(freq, list):
        return freq
    real = iter(freq)
    return [1 if i in noop else next(real) for i in range(args.num_layers)]


class _CpuRngTracker:
    """Stands in for megatron's CUDA RNG tracker; dropout is 0 in these forwards."""

    def fork(self, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext()


def _patch_cpu() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.is_available = lambda: False  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]  # dist_checkpointing calls it unconditionally
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    tracker = _CpuRngTracker()
    tensor_parallel.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker = lambda *a, **k: tracker
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # referenced unguarded when Transformer Engine is absent
        moe_utils.te_general_gemm = None


class CudaAsCpu(TorchFunctionMode):
    """For training on CPU (mcore_trainer): megatron-core's optimizer and DDP code create tensors
    with a literal `device="cuda"` and accept only parameters whose `Tensor.type()` is a
    'torch.cuda.*Tensor' string; this mode puts such tensors on the CPU and names CPU tensors by
    their CUDA type."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_meta else name
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _is_cuda(device: Any) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (isinstance(device, torch.device) and device.type == "cuda")


def _config(args: argparse.Namespace, layout: list[list[str]] | None) -> Any:
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
        if "moe_router_pre_softmax" in _config_fields(cls):  # Qwen3-MoE norm_topk_prob false: softmax over all, then top k
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


def _config_fields(cls: Any) -> dict[str, Any]:
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
    fields = _config_fields(cls)
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
    fields = _config_fields(cls)
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


def _layout_list(args: argparse.Namespace) -> list[list[str]]:
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

    spec = _call(get_gpt_decoder_block_spec, config, use_transformer_engine=False, optional={"vp_stage": vp_stage})
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

            mtp_spec = _call(get_gpt_mtp_block_spec, config, spec.layer_specs[-1], use_transformer_engine=False,
                             optional={"vp_stage": vp_stage})
        return _call(GPTModel, config, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     pre_process=stage == 0, post_process=last,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     position_embedding_type="rope", rotary_base=args.rotary_base, parallel_output=parallel_output,
                     mtp_block_spec=mtp_spec, optional={"vp_stage": vp_stage, "pg_collection": pg_collection})


def _call(fn: Any, *args: Any, optional: dict[str, Any], **kwargs: Any) -> Any:
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
    with _rank_set(ps.get_virtual_pipeline_model_parallel_rank, ps.set_virtual_pipeline_model_parallel_rank, vp_stage):
        yield


@contextlib.contextmanager
def _rank_set(get: Any, set_: Any, rank: int) -> Any:
    """A parallel_state rank set to `rank` for the block, the previous one restored after."""
    own = get()
    set_(rank)
    try:
        yield
    finally:
        set_(own)


def _load_torch_dist(model: Any, it_dir: Path) -> dict[str, Any]:
    """This rank's part of a torch_dist checkpoint, read by megatron-core for the model's layout."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    # The embedding copy of an MTP stage is tied across data-parallel ranks through this group.
    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    sharded = {k: v for k, v in model.sharded_state_dict(metadata=metadata).items()
               if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    return dist_checkpointing.load({"model": sharded}, str(it_dir))["model"]


def _worker(rank: int, world: int, port: int, ckpt_dir: str, tokens: torch.Tensor, out_file: str,
            layout: tuple[int, int, int] | None) -> None:
    warnings.filterwarnings("ignore")  # megatron-core warns about Apex/TE being absent, per module
    _patch_cpu()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps

    args, it_dir = read_args(Path(ckpt_dir), layout)
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    stages = stage_layout(args)
    chunks = len(stages) // pp
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
                                 expert_model_parallel_size=ep)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank() if ep > 1 else 0
    config = _config(args, _layout_list(args))
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")
    models = [m.eval() for m in load_rank_models(args, config, it_dir, name)]

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s).expand(b, 1, s, s)
    hidden_shape = (s, b, args.hidden_size)
    placement = stage_placement(args)
    kept = None  # the output of this rank's previous stage when it also runs the next (dualpipev's turn)
    with torch.no_grad():
        for stage, (owner, v) in enumerate(placement):
            if owner != pp_rank:
                continue
            model = models[v]
            if stage > 0:
                previous = placement[stage - 1][0]
                if previous == pp_rank:
                    hidden = kept
                else:
                    hidden = torch.empty(hidden_shape)
                    torch.distributed.recv(hidden, src=_stage_peer(previous))
                model.set_input_tensor(hidden)
            if stage < len(stages) - 1:
                kept = model(tokens, position_ids, mask).contiguous()
                if placement[stage + 1][0] != pp_rank:
                    torch.distributed.send(kept, dst=_stage_peer(placement[stage + 1][0]))
                continue
            if getattr(args, "mtp_num_layers", None):
                # With MTP the model computes losses from labels (the cross entropy then edits the logits
                # in place, hence the clone); the output layer's calls give the
                # MTP logits first, then the main logits ([s, b, V] each).
                calls: list[torch.Tensor] = []
                model.output_layer.register_forward_hook(lambda m, i, o, calls=calls: calls.append(o[0].clone()))
                model(tokens, position_ids, mask, labels=tokens)
                result = {"logits": calls[-1].transpose(0, 1), "mtp_logits": calls[0].transpose(0, 1)}
            else:
                result = {"logits": model(tokens, position_ids, mask)}
            if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
                torch.save({k: t.float() for k, t in result.items()}, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def load_rank_models(args: argparse.Namespace, config: Any, it_dir: Path, name: str, parallel_output: bool = False) -> list[Any]:
    """This rank's model chunks built from `args` and loaded strictly from its file (or torch_dist)."""
    from megatron.core import parallel_state as ps

    torch_dist = is_torch_dist(it_dir)
    pp, pp_rank = args.pipeline_model_parallel_size, ps.get_pipeline_model_parallel_rank()
    stages = stage_layout(args)
    chunks = len(stages) // pp
    ckpt = {} if torch_dist else torch.load(it_dir / name / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    placement, noop = stage_placement(args), _noop_layers(args)
    groups = _without_embedding_sync() if _dualpipev(args) else None
    models = []
    for v in range(chunks):
        stage = placement.index((pp_rank, v))
        with _built_as_pipeline_rank(stage % pp):
            model = build_model(args, config, stage, len(stages), stage // pp if chunks > 1 else None, parallel_output, groups)
        for i, layer in enumerate(model.decoder.layers):
            if layer.layer_number - 1 in noop:
                model.decoder.layers[i] = NoopLayer(layer.layer_number)
        state = _load_torch_dist(model, it_dir) if torch_dist else ckpt["model"] if chunks == 1 else ckpt[f"model{v}"]
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{name} chunk {v}: strict load failed: missing {missing} unexpected {result.unexpected_keys}")
        models.append(model)
    return models


@contextlib.contextmanager
def _built_as_pipeline_rank(rank: int) -> Any:
    """Build a dualpipev chunk as megatron-core builds the same forward stage under plain VPP (its layer
    numbers, first/last-stage parts): the pipeline rank megatron-core reads is that stage's rank there."""
    from megatron.core import parallel_state as ps

    with _rank_set(ps.get_pipeline_model_parallel_rank, ps.set_pipeline_model_parallel_rank, rank):
        yield


def _without_embedding_sync() -> Any:
    """Process groups without the embedding group: dualpipev keeps the first stage and the MTP stage on
    rank 0, where megatron-core's construction-time all-reduce (copying the embedding to the MTP stage)
    expects ranks 0 and PP-1 and would wait forever. The copy is loaded from the checkpoint anyway."""
    try:
        from megatron.core.process_groups_config import ProcessGroupCollection
    except ImportError as e:
        raise NotImplementedError("dualpipev needs a megatron-core whose GPTModel takes process groups") from e

    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.embd = None
    return groups


def _stage_peer(pp_rank: int) -> int:
    """Global rank of this rank's peer (same TP/EP/DP position) in pipeline stage `pp_rank`."""
    from megatron.core import parallel_state as ps

    return torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[pp_rank]


def mcore_logits(ckpt_dir: str | Path, tokens: torch.Tensor, layout: tuple[int, int, int] | None = None) -> torch.Tensor:
    """fp32 logits [batch, seq, padded_vocab] of the checkpoint run by megatron-core on CPU
    (a torch_dist checkpoint at `layout` (TP, PP, EP), default TP1/PP1/EP1)."""
    return mcore_outputs(ckpt_dir, tokens, layout)["logits"]


def mcore_outputs(ckpt_dir: str | Path, tokens: torch.Tensor, layout: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    """`logits`, and `mtp_logits` for checkpoints with an MTP layer."""
    ckpt_dir = Path(ckpt_dir)
    layout = layout or (1, 1, 1)
    args, _ = read_args(ckpt_dir, layout)
    world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * getattr(args, "expert_model_parallel_size", 1)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "logits.pt")
        mp.start_processes(_worker, args=(world, _free_port(), str(ckpt_dir), tokens, out_file, layout), nprocs=world,
                           join=True, start_method="spawn")
        return torch.load(out_file)
