"""Megatron-Core `torch_dist` checkpoints (dist_checkpointing), Megatron-LM's default format.

The format is parallel-layout free: each tensor is stored once at its global shape (layers stacked
on a leading axis, TP shards at their offsets, experts on an expert axis) and megatron-core reads
it back at any TP/PP/EP. Which keys, global shapes and offsets a model has is megatron-core's own
business, so they come from megatron-core: a GPTModel of the checkpoint's architecture built on
the meta device (no memory) at TP1/PP1/EP1 gives `sharded_state_dict()`, and at that layout the
local tensors are exactly the whole tensors this converter produces. Saving and loading go through
`dist_checkpointing.save` / `load`, in a one-process gloo group.

Memory: save and load are single calls here, so the whole model is held at once (unlike the
legacy `torch` format, which is written with constant memory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError

COMMON = "common.pt"
METADATA = "metadata.json"


def is_torch_dist(iteration_dir: Path) -> bool:
    return (iteration_dir / METADATA).is_file() and (iteration_dir / ".metadata").is_file()


def _quiet() -> None:
    """megatron-core warns at import, per module, that Transformer Engine and Apex are absent, and about
    config defaults irrelevant to a meta model."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


@contextlib.contextmanager
def megatron_session() -> Iterator[None]:
    """A one-process model-parallel world (TP = PP = EP = 1) for building meta models and for
    dist_checkpointing, which needs torch.distributed even for one writer."""
    from . import mcore_runner

    mcore_runner._patch_cpu()
    from megatron.core import parallel_state as ps

    with tempfile.TemporaryDirectory() as tmp:
        store = torch.distributed.FileStore(str(Path(tmp) / "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            ps.initialize_model_parallel(1, 1)
            yield
        finally:
            ps.destroy_model_parallel()
            torch.distributed.destroy_process_group()


def single_rank_args(ns: argparse.Namespace) -> argparse.Namespace:
    """The same architecture at TP1/PP1/EP1 without virtual stages (the global view)."""
    one = copy.copy(ns)
    one.tensor_model_parallel_size = one.pipeline_model_parallel_size = one.expert_model_parallel_size = 1
    one.virtual_pipeline_model_parallel_size = one.num_layers_per_virtual_pipeline_stage = None
    one.num_layer_list = None
    return one


def template(ns: argparse.Namespace) -> dict[str, Any]:
    """megatron-core's sharded state dict of the whole model, on the meta device."""
    from . import mcore_runner

    one = single_rank_args(ns)
    config = mcore_runner._config(one, None)
    with torch.device("meta"):
        model = mcore_runner.build_model(one, config, 0, 1, None)
    return model.sharded_state_dict()


def _is_tensor_entry(value: Any) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return isinstance(value, (ShardedTensor, ShardedTensorFactory))


def save(state: dict[str, torch.Tensor], ns: argparse.Namespace, iteration: int | str, directory: Path) -> None:
    """Write `state` (TP1/PP1 megatron-core local names -> whole tensors) as a torch_dist checkpoint;
    every tensor of the model must be present and nothing else."""
    _quiet()
    from megatron.core import dist_checkpointing

    with megatron_session():
        sharded = template(ns)
        for name, entry in sharded.items():
            if not _is_tensor_entry(entry):
                continue
            if name not in state:
                raise ConversionError(f"torch_dist: megatron-core's model has {name}, which the conversion did not produce")
            tensor = state.pop(name)
            if tuple(tensor.shape) != tuple(entry.data.shape):
                raise ConversionError(f"torch_dist: {name} has shape {list(tensor.shape)}, megatron-core expects "
                                      f"{list(entry.data.shape)}")
            entry.data = tensor
        if state:
            raise ConversionError(f"torch_dist: megatron-core's model has no {sorted(state)[0]}")
        common = {"args": ns, "checkpoint_version": 3.0, "iteration": 0 if iteration == "release" else iteration}
        directory.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({"model": sharded, **common}, str(directory))


def load(directory: Path) -> tuple[argparse.Namespace, dict[str, torch.Tensor]]:
    """The checkpoint's `args` and all its model tensors under TP1/PP1 megatron-core local names."""
    _quiet()
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as e:  # megatron raises several types for a damaged common.pt
        raise ConversionError(f"{directory / COMMON}: cannot read ({type(e).__name__}: {e})") from None
    ns = common.get("args")
    if ns is None:
        raise ConversionError(f"{directory / COMMON}: no 'args'; cannot tell the model's architecture")
    with megatron_session():
        stored = dist_checkpointing.load_tensors_metadata(str(directory))
        sharded = {k: v for k, v in template(ns).items() if _is_tensor_entry(v)}
        for name, entry in sharded.items():
            if entry.key not in stored:
                raise ConversionError(f"{directory}: torch_dist checkpoint has no {entry.key} (for {name})")
            entry.data = torch.empty(entry.data.shape, dtype=stored[entry.key].dtype)
        try:
            loaded = dist_checkpointing.load({"model": sharded}, str(directory))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConversionError(f"{directory}: cannot load the torch_dist checkpoint ({first})") from None
    return ns, loaded["model"]
