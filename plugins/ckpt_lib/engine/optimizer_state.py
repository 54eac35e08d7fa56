"""Distributed-optimizer state of Megatron-Core legacy checkpoints, per parameter, at any layout.

`distrib_optim.pt` (megatron-core `DistributedOptimizer.save_parameter_state`, format
`buckets_coalesced`) holds, per grad buffer of the rank, flat fp32 `param` (main params),
`exp_avg` and `exp_avg_sq` over the buffer's buckets with the padding at each bucket's end
removed. Where each parameter lies in them is decided by megatron-core's `_ParamAndGradBuffer`
(parameter order, 64-element alignment, bucket size, the shared embedding's own bucket), so it is
not recomputed here: the rank's GPTModel chunks are built on the meta device and wrapped in
megatron-core's `DistributedDataParallel` with the checkpoint's DDP settings, in a child process
whose default process group is torch's `fake` backend (any world size and rank in one process,
no communication, no memory), and the buffers' `param_index_map` and buckets are read back.

Tensors are exchanged as "full" tensors under global megatron-core names (layer numbers from
`TransformerLayer.layer_number`, expert indices as in megatron-core's `SequentialMLP`), gathered
over TP with the rules of `sharding.py` and laid out as at TP1 (a SwiGLU fc1 is [gate; up]).
The optimizers follow megatron-core's `get_megatron_optimizer`: one DistributedOptimizer over the
dense buffers of all chunks, and where a rank has routed experts a second one over their buffers
(then `distrib_optim.pt` is the ChainedOptimizer's list, `None` where the rank was not rank 0 of
that optimizer's data-parallel group).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from ..errors import ConversionError
from ..io.megatron_io import RANK_FILE, TRACKER, admitted, find_iteration_dir, iteration_dir_name, rank_dir_name
from ..layout import sharding
from ..transport import protocol as P

OPTIM_FILE = "distrib_optim.pt"
KEYS = ("param", "exp_avg", "exp_avg_sq")
TIED_OUTPUT = "output_layer.weight"
WORD_EMB = "embedding.word_embeddings.weight"
Rank = tuple[int, int, int]  # (tp, pp, ep)


# ---- layout: megatron-core's own buffers, built on the meta device in a child process ----

def _global_names(module: Any, ep_rank: int) -> dict[Any, str]:
    """Parameter -> global name: decoder layer numbers from megatron-core's `layer_number`, expert
    indices `ep_rank * num_local_experts + local` (megatron-core's SequentialMLP rule; decoder and
    MTP layers alike)."""
    names = {}
    for name, param in module.named_parameters():
        parts = name.split(".")
        if "local_experts" in parts:
            i = parts.index("local_experts") + 1
            experts = module.get_submodule(".".join(parts[:i - 1]))
            parts[i] = str(ep_rank * experts.num_local_experts + int(parts[i]))
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(module.decoder.layers[int(parts[2])].layer_number - 1)
        names[param] = ".".join(parts)
    return names


def _rule(name: str, param: Any, gated: bool) -> str:
    """The TP rule from megatron-core's own parameter attributes (SwiGLU fc1 is gated)."""
    if not getattr(param, "tensor_model_parallel", False):
        return sharding.REPLICATED
    if gated and name.rsplit(".", 2)[-2] == "linear_fc1":
        return sharding.GATED
    return sharding.COLUMN if param.partition_dim == 0 else sharding.ROW


def _describe_buffer(buffer: Any, names: dict[Any, str], gated: bool) -> dict[str, Any]:
    """Where each parameter lies in the bucket-coalesced flat tensors of `save_parameter_state`."""
    entries, base = [], 0
    for bucket in buffer.buckets:
        for param in bucket.params_list:
            start, end, _ = buffer.param_index_map[param]
            offset = start - bucket.offset + base
            entries.append((names[param], tuple(param.shape), _rule(names[param], param, gated), offset, offset + end - start))
        base += bucket.numel_unpadded
    return {"dtypes": (buffer.param_dtype, buffer.grad_dtype), "numel_unpadded": buffer.numel_unpadded, "params": entries}


def _ddp_config(args: argparse.Namespace, num_parameters: int) -> Any:
    """Megatron-LM's `get_megatron_ddp_config` + `resolve_ddp_bucket_size` from the saved args."""
    from megatron.core.distributed import DistributedDataParallelConfig

    overlap = bool(getattr(args, "overlap_grad_reduce", False))
    bucket_size = getattr(args, "ddp_bucket_size", None)
    if getattr(args, "ddp_num_buckets", None):
        bucket_size = num_parameters // args.ddp_num_buckets
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=bool(getattr(args, "accumulate_allreduce_grads_in_fp32", False)),
        overlap_grad_reduce=overlap, use_distributed_optimizer=True, bucket_size=bucket_size if overlap else None,
        pad_buckets_for_high_nccl_busbw=bool(getattr(args, "ddp_pad_buckets_for_high_nccl_busbw", False)))


def _layout_worker(_: int, args: argparse.Namespace, dp: int, out_file: str) -> None:
    """A child process (megatron-core's parallel state is process-wide) on megatron-core's CPU shim."""
    from ..io.mcore_model import on_cpu

    warnings.filterwarnings("ignore")
    with on_cpu():
        _write_layouts(args, dp, out_file)


def _write_layouts(args: argparse.Namespace, dp: int, out_file: str) -> None:
    import dataclasses

    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..io.mcore_model import build_model, layout_names, stage_layout, transformer_config

    torch.cuda.current_device = lambda: torch.device("meta")  # type: ignore[assignment]  # DDP buffers on meta
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel

    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, getattr(args, "expert_model_parallel_size", 1) or 1
    stages = stage_layout(args)
    chunks = len(stages) // pp
    world = tp * pp * dp
    params_dtype = args.params_dtype if isinstance(getattr(args, "params_dtype", None), torch.dtype) else torch.float32
    layouts: dict[Rank, dict[str, Any]] = {}
    for rank in range(world):
        torch.distributed.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
                                     expert_model_parallel_size=ep, create_gloo_process_groups=False)
        key = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank())
        if key not in layouts:
            config = transformer_config(args, layout_names(args))
            # perform_initialization: megatron-core sets the TP attributes (tensor_model_parallel,
            # partition_dim) only while initializing; on meta it costs nothing.
            config = dataclasses.replace(config, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
                                         fp16=params_dtype == torch.float16, perform_initialization=True)
            with torch.device("meta"):
                modules = [build_model(args, config, v * pp + key[1], len(stages), v if chunks > 1 else None) for v in range(chunks)]
            ddp_config = _ddp_config(args, sum(p.numel() for m in modules for p in m.parameters()))
            dense, expert = [], []
            for v, module in enumerate(modules):
                ddp = DistributedDataParallel(config, ddp_config, module, disable_bucketing=v > 0 or bool(
                    getattr(args, "overlap_param_gather_with_optimizer_step", False)))
                names = _global_names(module, key[2])
                dense += [_describe_buffer(b, names, config.gated_linear_unit) for b in ddp.buffers]
                expert += [_describe_buffer(b, names, config.gated_linear_unit) for b in ddp.expert_parallel_buffers]
            layouts[key] = {"dense": dense, "expert": expert}
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    torch.save(layouts, out_file)


def buffer_layouts(args: argparse.Namespace, dp: int) -> dict[Rank, dict[str, Any]]:
    """(tp, pp, ep) -> {'dense': [buffer], 'expert': [buffer]} as megatron-core lays them out for
    `args`' model and layout with `dp` data-parallel replicas."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "layout.pt")
        mp.start_processes(_layout_worker, args=(args, dp, out), nprocs=1, join=True, start_method="spawn")
        return torch.load(out, weights_only=False)


def _process_args(args: argparse.Namespace) -> argparse.Namespace:
    """`args` without the process-only fields, checked for what this module supports."""
    if getattr(args, "context_parallel_size", 1) not in (None, 1):
        raise ConversionError(f"optimizer state: context parallel size {args.context_parallel_size} is not supported")
    etp = getattr(args, "expert_tensor_parallel_size", None)
    if getattr(args, "num_experts", None) and etp not in (None, args.tensor_model_parallel_size):
        raise ConversionError(f"optimizer state: expert tensor parallel size {etp} != TP {args.tensor_model_parallel_size} is not supported")
    if getattr(args, "num_distributed_optimizer_instances", 1) not in (None, 1):
        raise ConversionError("optimizer state: --num-distributed-optimizer-instances > 1 is not supported")
    return args


def _data_parallel_size(args: argparse.Namespace) -> int:
    dp = getattr(args, "data_parallel_size", None)
    if dp is None:
        world = getattr(args, "world_size", None)
        dp = world // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size) if world else 1
    return dp


# ---- reading ----

def _load(path: Path, mmap: bool = False) -> Any:
    """A rank or optimizer file, read with `weights_only` (no code runs)."""
    if not path.is_file():
        raise ConversionError(f"{path} is missing")
    try:
        with admitted(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - corrupt zips and pickles raise several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: cannot read optimizer state ({first})") from None


def _grid(it_dir: Path, args: argparse.Namespace) -> dict[Rank, Path]:
    """(tp, pp, ep) -> rank file for the layout in `args`, every one checked to exist."""
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, getattr(args, "expert_model_parallel_size", 1) or 1
    grid = {(t, p, e): it_dir / rank_dir_name(t, p, e, pp, ep) / RANK_FILE for t in range(tp) for p in range(pp) for e in range(ep)}
    for path in grid.values():
        if not path.is_file():
            raise ConversionError(f"{path} is missing (args say TP{tp} PP{pp} EP{ep})")
    return grid


def _check_buffer(state: Any, layout: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The flat tensors of one buffer, checked against megatron-core's layout for it."""
    if not isinstance(state, dict) or layout["dtypes"] not in state:
        found = list(state) if isinstance(state, dict) else type(state).__name__
        raise ConversionError(f"{where}: expected a buffer of dtypes {layout['dtypes']}, found {found}")
    tensors = state[layout["dtypes"]]
    n = layout["numel_unpadded"]
    for key in KEYS:
        t = tensors.get(key)
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else t
            raise ConversionError(f"{where}: {key} has shape {shape}, but megatron-core lays this rank's buffer out "
                                  f"with {n} elements: the file does not belong to this model/layout")
        if not torch.isfinite(t).all():
            raise ConversionError(f"{where}: {key} holds NaN or Inf")
    return tensors


def _rank_optimizers(raw: Any, layout: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """(kind, state) of each optimizer of a rank, as its ChainedOptimizer saved them."""
    kinds = ["dense"] + (["expert"] if layout["expert"] else [])
    if isinstance(raw, list):
        if len(raw) != len(kinds):
            raise ConversionError(f"{where}: {len(raw)} optimizer states, but this rank has {len(kinds)} optimizers ({', '.join(kinds)})")
        return list(zip(kinds, raw))
    if len(kinds) != 1:
        raise ConversionError(f"{where}: one optimizer state, but this rank has dense and expert optimizers")
    return [("dense", raw)]


def _iteration_state(path: Path, raw: Any, layout: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """{global name: {key: local shard}} of one rank file."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for kind, opt_state in _rank_optimizers(raw, layout, str(path)):
        if opt_state is None:
            continue
        if not isinstance(opt_state, dict) or opt_state.get("buckets_coalesced") is not True:
            raise ConversionError(f"{path}: not a megatron-core DistributedOptimizer parameter state in the "
                                  "'buckets_coalesced' format (megatron-core >= 0.7); re-save it with a newer Megatron")
        buffers = layout[kind]
        if set(k for k in opt_state if isinstance(k, int)) != set(range(len(buffers))):
            raise ConversionError(f"{path}: {kind} optimizer has buffers {sorted(k for k in opt_state if isinstance(k, int))}, "
                                  f"megatron-core builds {len(buffers)} for this rank")
        for g, buf in enumerate(buffers):
            tensors = _check_buffer(opt_state[g], buf, f"{path} ({kind} buffer {g})")
            for name, shape, _, start, end in buf["params"]:
                out[name] = {k: tensors[k][start:end].view(shape) for k in KEYS}
    return out


def _gather(name: str, rule: str, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    full = {}
    for key in KEYS:
        t = sharding.gather([s[key] for s in shards], rule, f"{name} {key}")
        full[key] = torch.cat(t, dim=0) if rule == sharding.GATED else t
    return full


def read_optimizer_state(load_dir: str | Path) -> dict[str, Any]:
    """The distributed-optimizer state of a legacy checkpoint: `params` {global megatron-core name:
    {'param', 'exp_avg', 'exp_avg_sq'} full fp32 tensors}, the rank-independent `common` parts
    (iteration, scheduler, optimizer hyper-parameter groups, grad scaler) and the source `args`
    and per-rank `rng_state`. Raises ConversionError when the files are missing, unreadable or
    do not match megatron-core's buffer layout for the checkpoint's model."""
    it_dir, _ = find_iteration_dir(Path(load_dir))
    first = _load(sorted(it_dir.glob(f"mp_rank_*/{RANK_FILE}"))[0])
    args = _process_args(first["args"])
    grid = _grid(it_dir, args)
    if not getattr(args, "use_distributed_optimizer", False):
        raise ConversionError(f"{load_dir}: args.use_distributed_optimizer is not set; only the distributed "
                              "optimizer's state (distrib_optim.pt) is supported")
    if "optimizer" not in first:
        raise ConversionError(f"{load_dir}: the checkpoint has no optimizer state (saved with --no-save-optim?)")
    layouts = buffer_layouts(args, _data_parallel_size(args))
    shards: dict[str, dict[Rank, dict[str, torch.Tensor]]] = {}
    rules: dict[str, str] = {}
    rank_states: dict[Rank, dict[str, Any]] = {}
    for rank, rank_file in sorted(grid.items()):
        path = rank_file.parent / OPTIM_FILE
        if not path.exists():
            raise ConversionError(f"{path} is missing (the checkpoint was saved without the distributed optimizer state)")
        for name, local in _iteration_state(path, _load(path), layouts[rank]).items():
            shards.setdefault(name, {})[rank] = local
        for kind in ("dense", "expert"):
            for buf in layouts[rank][kind]:
                rules.update({name: rule for name, _, rule, _, _ in buf["params"]})
        ckpt = _load(rank_file)
        rank_states[rank] = {k: ckpt.get(k) for k in ("optimizer", "rng_state")}
    tp = args.tensor_model_parallel_size
    params: dict[str, dict[str, torch.Tensor]] = {}
    for name, by_rank in shards.items():
        groups: dict[tuple[int, int], dict[int, dict[str, torch.Tensor]]] = {}
        for (t, p, e), local in by_rank.items():
            groups.setdefault((p, e), {})[t] = local
        (p, e), first_group = min(groups.items())  # replicas over PP (tied copies) and EP (dense) are equal
        if sorted(first_group) != list(range(tp)):
            raise ConversionError(f"{name}: optimizer state found on TP ranks {sorted(first_group)} of {tp}")
        params[name] = _gather(name, rules[name], [first_group[t] for t in range(tp)])
    if not getattr(args, "untie_embeddings_and_output_weights", False):
        params.pop(TIED_OUTPUT, None)  # the last stage's copy of the word embeddings
    common = {k: first.get(k) for k in ("iteration", "opt_param_scheduler", "num_floating_point_operations_so_far")}
    return {"params": params, "common": common, "args": args, "ranks": rank_states}


# ---- writing ----

def _param_groups(ranks: dict[Rank, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """Every hyper-parameter group of the source (megatron-core matches them by `wd_mult`, `lr_mult`,
    `is_expert_parallel`, `is_decoupled_lr` when loading), dense and expert apart, and the grad scaler."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    scaler = None
    for state in ranks.values():
        sds = state["optimizer"] if isinstance(state["optimizer"], list) else [state["optimizer"]]
        for sd in sds:
            scaler = sd.get("grad_scaler", scaler)
            for g in sd["optimizer"]["param_groups"]:
                groups[tuple(g.get(k) for k in param_group_identifier_keys)] = g
    dense = [g for g in groups.values() if not g.get("is_expert_parallel")]
    expert = [g for g in groups.values() if g.get("is_expert_parallel")]
    return dense, expert, scaler


def _fit_rows(full: torch.Tensor, rows: int, fill: torch.Tensor | None) -> torch.Tensor:
    """A vocabulary table trimmed or grown to the target's padded rows (new rows: `fill` or 0)."""
    if full.shape[0] >= rows:
        return full[:rows]
    extra = fill[full.shape[0]:rows] if fill is not None else full.new_zeros(rows - full.shape[0], *full.shape[1:])
    return torch.cat([full, extra.to(full.dtype)], dim=0)


def _buffer_state(buf: dict[str, Any], params: dict[str, dict[str, torch.Tensor]], tp: int, tp_rank: int,
                  weights: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The flat `param`/`exp_avg`/`exp_avg_sq` of one target buffer, filled from the full tensors."""
    flat = {k: torch.zeros(buf["numel_unpadded"], dtype=torch.float32) for k in KEYS}
    for name, shape, rule, start, end in buf["params"]:
        source = params.get(name) or (params.get(WORD_EMB) if tied and name == TIED_OUTPUT else None)
        if source is None:
            raise ConversionError(f"optimizer state: no state for {name} in the source checkpoint")
        for key in KEYS:
            full = source[key]
            if rule == sharding.GATED:
                full = tuple(torch.chunk(full, 2, dim=0))
            elif name in (WORD_EMB, TIED_OUTPUT) and full.shape[0] != shape[0] * tp:
                local_weight = weights.get(name)
                fill = None
                if key == "param" and local_weight is not None:  # new padding rows start from the written weights
                    fill = torch.cat([full.new_zeros(shape[0] * tp_rank, *shape[1:]), local_weight.float()])
                full = _fit_rows(full, shape[0] * tp, fill)
            local = sharding.split(full, rule, tp, f"{name} {key}")[tp_rank]
            if tuple(local.shape) != shape:
                raise ConversionError(f"optimizer state: {name} {key} is {tuple(local.shape)} on TP rank {tp_rank}, "
                                      f"the target model has {shape}")
            flat[key][start:end] = local.reshape(-1)
    return flat


# Settings of the source run that decide megatron-core's buffer layout (bucketing, grad dtype).
DDP_FIELDS = ("accumulate_allreduce_grads_in_fp32", "overlap_grad_reduce", "overlap_param_gather", "ddp_bucket_size",
              "ddp_num_buckets", "ddp_pad_buckets_for_high_nccl_busbw", "overlap_param_gather_with_optimizer_step")


def _training_args(args: argparse.Namespace, src: argparse.Namespace, dp: int) -> None:
    """The target `args` completed with the source run's DDP settings and the target's DP size."""
    for field in DDP_FIELDS:
        if hasattr(src, field):
            setattr(args, field, getattr(src, field))
    ep = getattr(args, "expert_model_parallel_size", 1) or 1
    if dp < 1 or dp % ep:
        raise ConversionError(f"optimizer state: data-parallel size {dp} is not a multiple of the expert-parallel size {ep}")
    args.data_parallel_size = dp
    args.world_size = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * dp


def write_optimizer_state(save_dir: str | Path, state: dict[str, Any], *, dp: int | None = None, keep_rng: bool | None = None,
                          report: Any = print) -> None:
    """Add the optimizer state read by `read_optimizer_state` to the legacy checkpoint in `save_dir`
    (written by the converter at the target layout, `dp` data-parallel replicas, default the
    expert-parallel size): `distrib_optim.pt`
    per rank directory, and in each `model_optim_rng.pt` the `optimizer` hyper-parameter groups,
    `opt_param_scheduler`, `iteration` and `args.use_distributed_optimizer`. The RNG state is
    per rank, so it is carried only when TP, PP and EP are unchanged (`keep_rng=None`) and
    dropped otherwise with a notice (resume with `--no-load-rng`)."""
    it_dir, _ = find_iteration_dir(Path(save_dir))
    args = _process_args(_load(sorted(it_dir.glob(f"mp_rank_*/{RANK_FILE}"))[0])["args"])
    grid = _grid(it_dir, args)
    src = state["args"]
    dp = dp or getattr(args, "expert_model_parallel_size", 1) or 1
    _training_args(args, src, dp)
    same_layout = all(getattr(src, f, 1) == getattr(args, f, 1) for f in
                      ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
    if keep_rng is None:
        keep_rng = same_layout
        if not same_layout:
            report("optimizer state: RNG state not carried (the parallel layout changed); resume with --no-load-rng")
    layouts = buffer_layouts(args, dp)
    dense_groups, expert_groups, scaler = _param_groups(state["ranks"])
    tied = not getattr(args, "untie_embeddings_and_output_weights", False)
    for rank, path in sorted(grid.items()):
        ckpt, layout = _load(path, mmap=True), layouts[rank]  # one rank's weights at a time, memory-mapped
        _training_args(ckpt["args"], src, dp)
        weights = {k: v for key, sd in ckpt.items() if key.startswith("model") for k, v in sd.items()
                   if isinstance(v, torch.Tensor) and k in (WORD_EMB, TIED_OUTPUT)}
        optim_states, optim_sds = [], []
        for kind, groups in (("dense", dense_groups), ("expert", expert_groups)):
            if kind == "expert" and not layout["expert"]:
                continue
            buffers = {}
            for g, buf in enumerate(layout[kind]):
                flat = _buffer_state(buf, state["params"], args.tensor_model_parallel_size, rank[0], weights, tied)
                buffers[g] = {buf["dtypes"]: {**flat, "numel_unpadded": buf["numel_unpadded"]}}
            # The dense state is written by the rank that is DP rank 0 of the dense group, which has EP rank 0.
            optim_states.append({"buckets_coalesced": True, **buffers} if kind == "expert" or rank[2] == 0 else None)
            sd: dict[str, Any] = {"optimizer": {"param_groups": [dict(g) for g in groups]}}
            if scaler is not None:
                sd["grad_scaler"] = scaler
            optim_sds.append(sd)
        torch.save(optim_states[0] if len(optim_states) == 1 else optim_states, path.parent / OPTIM_FILE)
        ckpt["optimizer"] = optim_sds[0] if len(optim_sds) == 1 else optim_sds
        for key, value in state["common"].items():
            if value is not None:
                ckpt[key] = value
        ckpt["args"].use_distributed_optimizer = True
        ckpt["args"].iteration = state["common"]["iteration"]
        rng = state["ranks"].get(rank, {}).get("rng_state")
        if keep_rng and rng is not None:
            ckpt["rng_state"] = rng
        else:
            ckpt.pop("rng_state", None)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # the mapped original stays readable until replaced
        del ckpt
    _retarget_iteration(Path(save_dir), it_dir, state["common"]["iteration"])


def _retarget_iteration(root: Path, it_dir: Path, iteration: int | None) -> None:
    """Name the iteration directory and tracker after the source's iteration, as a resume expects."""
    if iteration is None:
        return
    target = root / iteration_dir_name(iteration)
    if target != it_dir:
        it_dir.rename(target)
    (root / TRACKER).write_text(f"{iteration}\n")


# ---- converter wiring: the optional protocol message "optimizer state" ----

MESSAGE_KEYS = ("params", "common", "args", "ranks")


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def add_loader_arguments(group: Any) -> None:
    group.add_argument("--no-load-optim", action="store_true",
                       help="Do not carry the source's distributed-optimizer state (distrib_optim.pt) to the saver")


def add_saver_arguments(group: Any) -> None:
    group.add_argument("--no-save-optim", action="store_true", help="Do not write the optimizer state the loader sends")
    group.add_argument("--no-save-rng", action="store_true", help="Do not write the RNG state the loader sends")
    group.add_argument("--target-data-parallel-size", type=int, default=None,
                       help="Data-parallel size the target run will use; lays out distrib_optim.pt's buckets as "
                            "megatron-core does for it (default: the target expert-parallel size, the smallest valid)")


def loader_message(loader: Any) -> dict[str, Any] | None:
    """The "optimizer state" message for a core_ext loader (`mcore_loader.McoreLoader`), or None
    when there is none to carry or it cannot be carried (with a notice)."""
    args = loader.args
    if getattr(args, "no_load_optim", False) or loader.export:
        return None
    grid = loader.files.grid
    missing = [path.parent / OPTIM_FILE for path in grid.values() if not (path.parent / OPTIM_FILE).exists()]
    if len(missing) == len(grid):
        legacy = all(path.name == RANK_FILE for path in grid.values())  # torch_dist: the iteration directory
        if legacy and "optimizer" in loader.files.file(0, 0):
            _note("optimizer state: only the distributed optimizer's state (distrib_optim.pt) is carried; this checkpoint's is not")
        return None
    reason = ("LoRA adapters are merged" if loader.found_adapters or loader.lora_files is not None else
              "MindSpeed-LLM names" if loader.mindspeed or loader.tp_extend else
              f"upstream saver_{args.saver} does not take it" if getattr(args, "saver", None) in P.UPSTREAM_SAVERS else None)
    if reason:
        _note(f"optimizer state not carried ({reason}); pass --no-load-optim to silence this")
        return None
    if getattr(args, "share", None) is not None:
        raise ConversionError("the optimizer state is carried by a single-process conversion: drop --workers "
                              "(or torchrun), or pass --no-load-optim")
    if missing:
        raise ConversionError(f"{missing[0]} is missing (other ranks have their distributed optimizer state); "
                              "pass --no-load-optim to convert the weights alone")
    return {"name": P.OPTIMIZER_STATE, **read_optimizer_state(args.load_dir)}


def receive_message(msg: dict[str, Any] | None, reader: P.MessageReader) -> dict[str, Any] | None:
    """The state of an "optimizer state" message (None: none sent), its keys checked."""
    if msg is None:
        return None
    state = {key: P.take(msg, key) for key in MESSAGE_KEYS}
    reader.finish(msg)
    if not isinstance(state["params"], dict) or not isinstance(state["args"], argparse.Namespace):
        raise ConversionError("optimizer state: malformed message")
    return state


def save_with(saver: Any, root: Path) -> None:
    """Write the optimizer state a core_ext saver (`mcore_saver.McoreSaver`) received into its staged
    output `root`, before the manifest is written and the output committed."""
    state, args = getattr(saver, "optimizer", None), saver.args
    if state is None:
        return
    saver.optimizer = None
    if saver.share is not None:
        raise ConversionError("the optimizer state is written by a single-process conversion: drop --workers (or torchrun)")
    if not saver.format.carries_optimizer:
        _note(f"optimizer state not written: the {saver.format.name} output carries weights only (use --ckpt-format torch)")
        return
    if getattr(args, "no_save_optim", False):
        _note("optimizer state not written (--no-save-optim)")
        return
    if saver.naming != "megatron-core" or saver.grouped or getattr(args, "qlora_nf4", False):
        raise ConversionError("optimizer state: written for megatron-core's own names only (drop --naming mindspeed, "
                              "--moe-grouped-gemm, --qlora-nf4, or pass --no-save-optim / --no-load-optim)")
    write_optimizer_state(root, state, dp=getattr(args, "target_data_parallel_size", None), keep_rng=False if getattr(args, "no_save_rng", False) else None, report=_note)
    # The rank files were rewritten: checksums computed while the saver ran are stale.
    saver.manifest.forget_checksums()
