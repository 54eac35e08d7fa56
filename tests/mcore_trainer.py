"""Train a converted checkpoint a few steps with real megatron-core 0.16.1 on CPU and save it as
Megatron-LM's legacy `torch` format does, optimizer state included (the proof that optimizer
state survives resharding; needs megatron-core, which conversions do not).

Per rank (gloo, one process each, mcore_model's `on_cpu` plus the `CudaAsCpu` mode below): the
GPTModel chunks of ckpt_verify.mcore_runner, wrapped as Megatron-LM's `get_model` does in megatron-core
`DistributedDataParallel` (grads reduced in fp32, distributed optimizer buffers, bucketing off for
chunks after the first and for PP ranks > 0), `get_megatron_optimizer` (Adam, distributed
optimizer, fp32 main params) and `OptimizerParamScheduler`; one step is megatron-core's
`get_forward_backward_func()` schedule, `optimizer.step()` and `scheduler.step(global_batch)`.

The saved layout is Megatron-LM's (megatron/training/checkpointing.py, `save_checkpoint` /
`generate_state_dict`): `iter_{it:07d}/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` with `args`,
`checkpoint_version` 3.0, `iteration`, `model` (`model0..` per VPP chunk), `optimizer`
(`optimizer.state_dict()`), `opt_param_scheduler`, `rng_state` (a one-element list, as without
`--data-parallel-random-init`) and `num_floating_point_operations_so_far`, written by DP rank 0;
`distrib_optim.pt` next to it from `optimizer.save_parameter_state`; then
`latest_checkpointed_iteration.txt`. Resuming loads them as Megatron-LM's `load_checkpoint` does:
`optimizer.load_state_dict`, `optimizer.load_parameter_state`, `opt_param_scheduler.load_state_dict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from ckpt_verify.mcore_runner import TRACKER, free_port, load_rank_models, read_args
from torch.overrides import TorchFunctionMode

from ckpt_lib.io.mcore_model import layout_names, on_cpu, stage_layout, transformer_config


class CudaAsCpu(TorchFunctionMode):
    """For training on CPU: megatron-core's optimizer and DDP code create tensors
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


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What one run does: its data-parallel size, steps, batch and optimizer hyper-parameters."""

    dp: int = 1
    steps: int = 3
    global_batch: int = 4
    micro_batch: int = 1
    seq_length: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    bf16: bool = False
    save_at: tuple[int, ...] = ()  # iterations to checkpoint at (the last step is always saved)
    load_optim: bool = False  # resume optimizer, scheduler and RNG from the loaded checkpoint
    save_rng: bool = True  # False: Megatron-LM's --no-save-rng
    data_seed: int = 1234


def _rank_name(tp_rank: int, pp_rank: int, ep_rank: int, pp: int, ep: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")


def batch_tokens(spec: TrainSpec, iteration: int, vocab: int) -> torch.Tensor:
    """The global batch of iteration `iteration` (1-based), the same at every layout."""
    gen = torch.Generator().manual_seed(spec.data_seed + iteration)
    return torch.randint(0, vocab, (spec.global_batch, spec.seq_length + 1), generator=gen)


def _train_args(args: argparse.Namespace, spec: TrainSpec) -> argparse.Namespace:
    """The checkpoint's `args` with the training settings Megatron-LM records and the reader needs."""
    out = argparse.Namespace(**vars(args))
    out.data_parallel_size = spec.dp
    out.world_size = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * spec.dp
    out.use_distributed_optimizer = True
    out.optimizer = "adam"
    out.accumulate_allreduce_grads_in_fp32 = True
    out.overlap_grad_reduce = False
    out.overlap_param_gather = False
    out.overlap_param_gather_with_optimizer_step = False
    out.ddp_bucket_size = None
    out.ddp_num_buckets = None
    out.ddp_pad_buckets_for_high_nccl_busbw = False
    out.bf16, out.fp16 = spec.bf16, False
    out.params_dtype = torch.bfloat16 if spec.bf16 else torch.float32
    out.micro_batch_size, out.global_batch_size, out.seq_length = spec.micro_batch, spec.global_batch, spec.seq_length
    out.lr, out.min_lr, out.weight_decay, out.clip_grad = spec.lr, spec.min_lr, spec.weight_decay, spec.clip_grad
    out.no_save_optim, out.no_save_rng = None, not spec.save_rng
    out.data_parallel_random_init = False
    out.ckpt_format = "torch"
    return out


def _rng_state() -> list[dict[str, Any]]:
    """Megatron-LM's `get_rng_state` on one rank; no CUDA generator or tracker exists on CPU, so
    `cuda_rng_state` repeats the CPU state and the tracker states are empty."""
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
             "rng_tracker_states": {}}]


def _patch_torch_adam_resume() -> None:
    """megatron-core 0.16.1 bug without Apex/TE: torch's Adam keeps a per-parameter `step` that
    `DistributedOptimizer.load_state_dict` puts into the state, and `load_parameter_state` then
    copies every state key from the file, which has none (KeyError 'step'). The step is already
    set from the param groups, so it is kept as is."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: Any, tensors: dict[str, torch.Tensor]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        original(self, model_param, tensors if step is None else {**tensors, "step": step})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _worker(rank: int, world: int, port: int, load_dir: str, save_dir: str, spec: TrainSpec, layout: tuple[int, int, int]) -> None:
    warnings.filterwarnings("ignore")
    with on_cpu():
        _train_rank(rank, world, port, load_dir, save_dir, spec, layout)


def _train_rank(rank: int, world: int, port: int, load_dir: str, save_dir: str, spec: TrainSpec, layout: tuple[int, int, int]) -> None:
    _patch_torch_adam_resume()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    with CudaAsCpu():
        _train(load_dir, save_dir, spec, layout)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _train(load_dir: str, save_dir: str, spec: TrainSpec, layout: tuple[int, int, int]) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    src_args, it_dir = read_args(Path(load_dir))
    src = torch.load(sorted(it_dir.glob("mp_rank_*/model_optim_rng.pt"))[0], map_location="cpu", weights_only=False)
    args = _train_args(src_args, spec)
    tp, pp, ep = layout
    if (tp, pp, ep) != (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size):
        raise ValueError(f"checkpoint layout TP{args.tensor_model_parallel_size} PP{args.pipeline_model_parallel_size} "
                         f"EP{args.expert_model_parallel_size} differs from the requested {layout}")
    chunks = len(stage_layout(args)) // pp
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
                                 expert_model_parallel_size=ep)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank() if ep > 1 else 0
    name = _rank_name(tp_rank, pp_rank, ep_rank, pp, ep)
    # Initialized as Megatron-LM does (then overwritten by the checkpoint): megatron-core sets the
    # TP attributes the grad norm relies on only while initializing.
    config = dataclasses.replace(transformer_config(args, layout_names(args)), perform_initialization=True)
    if spec.bf16:
        config = dataclasses.replace(config, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    torch.manual_seed(0)
    chunks_models = load_rank_models(args, config, it_dir, name, parallel_output=True)
    if spec.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks_models = [Float16Module(config, m) for m in chunks_models]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True, bucket_size=None)
    model = [DistributedDataParallel(config, ddp_config, m, disable_bucketing=i > 0) for i, m in enumerate(chunks_models)]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if chunks > 1 else model[0].no_sync
    opt_config = OptimizerConfig(optimizer="adam", lr=spec.lr, min_lr=spec.min_lr, weight_decay=spec.weight_decay,
                                 adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=spec.clip_grad,
                                 bf16=spec.bf16, params_dtype=args.params_dtype, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=spec.lr, min_lr=spec.min_lr,
                                        lr_warmup_steps=spec.warmup_steps * spec.global_batch,
                                        lr_decay_steps=100 * spec.global_batch, lr_decay_style="cosine",
                                        start_wd=spec.weight_decay, end_wd=spec.weight_decay, wd_incr_steps=1,
                                        wd_incr_style="constant")
    iteration = 0
    if spec.load_optim:
        iteration = src["iteration"]
        # no_grad: with fp32 params the main params are views of the (grad-requiring) model
        # params, which megatron-core's load_parameter_state copies into in place.
        with torch.no_grad():
            optimizer.load_state_dict(src["optimizer"])
            optimizer.load_parameter_state(str(it_dir / name / "distrib_optim.pt"))
        # megatron-core 0.16.1 without Apex/TE: load_state_dict gives every parameter the same
        # `step` tensor, which torch's Adam then increments once per parameter.
        for inner in optimizer.chained_optimizers:
            for param_state in inner.optimizer.state.values():
                param_state["step"] = param_state["step"].clone()
        scheduler.load_state_dict(src["opt_param_scheduler"])
        if "rng_state" in src:
            state = src["rng_state"][0]
            random.setstate(state["random_rng_state"])
            np.random.set_state(state["np_rng_state"])
            torch.set_rng_state(state["torch_rng_state"])
    args.consumed_train_samples = iteration * spec.global_batch

    dp_rank = ps.get_data_parallel_rank()
    num_micro = spec.global_batch // (spec.micro_batch * spec.dp)
    forward_backward = get_forward_backward_func()
    s = spec.seq_length
    position_ids = torch.arange(s).unsqueeze(0).expand(spec.micro_batch, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s).expand(spec.micro_batch, 1, s, s)

    def forward_step(data_iterator: Any, module: Any) -> tuple[torch.Tensor, Any]:
        rows = next(data_iterator)
        output = module(rows[:, :-1], position_ids, mask, labels=rows[:, 1:])

        def loss_func(losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = losses.float().mean()
            return loss, {"lm loss": loss.detach()}

        return output, loss_func

    last = iteration + spec.steps
    while iteration < last:
        iteration += 1
        tokens = batch_tokens(spec, iteration, args.padded_vocab_size)
        mine = tokens.view(num_micro, spec.dp, spec.micro_batch, -1)[:, dp_rank]  # Megatron's sampler order
        data = [iter(list(mine)) for _ in range(chunks)] if chunks > 1 else iter(list(mine))
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=data, model=model if chunks > 1 else model[0],
                         num_microbatches=num_micro, seq_length=s, micro_batch_size=spec.micro_batch, forward_only=False)
        ok, _, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {iteration} skipped")
        scheduler.step(increment=spec.global_batch)
        args.consumed_train_samples += spec.global_batch
        if iteration == last or iteration in spec.save_at:
            # Megatron-LM: the rank file is written by expert-data-parallel rank 0 (DP rank 0 without experts).
            _save(Path(save_dir), iteration, args, model, optimizer, scheduler, name, ps.get_expert_data_parallel_rank())


def _save(root: Path, iteration: int, args: argparse.Namespace, model: list[Any], optimizer: Any, scheduler: Any,
          name: str, writer_rank: int) -> None:
    """Megatron-LM's legacy save: the rank file on expert-DP rank 0, then `save_parameter_state` (a
    collective over the data-parallel group, written by its rank 0), then the tracker."""
    args.iteration = iteration
    rank_dir = root / f"iter_{iteration:07d}" / name
    state: dict[str, Any] = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
    for i, m in enumerate(model):
        state["model" if len(model) == 1 else f"model{i}"] = m.state_dict_for_save_checkpoint()
    state["optimizer"] = optimizer.state_dict()
    state["opt_param_scheduler"] = scheduler.state_dict()
    if not args.no_save_rng:
        state["rng_state"] = _rng_state()
    state["num_floating_point_operations_so_far"] = 0
    if writer_rank == 0:
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, rank_dir / "model_optim_rng.pt")
    torch.distributed.barrier()
    optimizer.save_parameter_state(str(rank_dir / "distrib_optim.pt"))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (root / TRACKER).write_text(f"{iteration}\n")


def train(load_dir: str | Path, save_dir: str | Path, spec: TrainSpec) -> None:
    """Train the checkpoint in `load_dir` (at its own TP/PP/EP, `spec.dp` data-parallel replicas)
    and save to `save_dir`; with `spec.load_optim` the run resumes its optimizer state."""
    args, _ = read_args(Path(load_dir))
    layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, getattr(args, "expert_model_parallel_size", 1))
    world = layout[0] * layout[1] * spec.dp
    mp.start_processes(_worker, args=(world, free_port(), str(load_dir), str(save_dir), spec, layout),
                       nprocs=world, join=True, start_method="spawn")
