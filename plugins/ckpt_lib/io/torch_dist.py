"""Megatron-Core `torch_dist` checkpoints (dist_checkpointing), Megatron-LM's default format.

The format is parallel-layout free: each tensor is stored once at its global shape (layers stacked
on a leading axis, TP shards at their offsets, experts on an expert axis) and megatron-core reads
it back at any TP/PP/EP. Which keys, global shapes and offsets a model has is megatron-core's own
business, so they come from megatron-core: a GPTModel of the checkpoint's architecture built on
the meta device (no memory) at TP1/PP1/EP1 gives `sharded_state_dict()`, and at that layout the
local tensors are exactly the whole tensors this converter produces. Saving and loading go through
`dist_checkpointing.save` / `load`, in a one-process gloo group.

Memory: writing streams tensor by tensor (see TorchDistWriter); loading reads the whole model in
one `dist_checkpointing.load`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from .megatron_io import admitted

COMMON = "common.pt"
FILE_BYTES = 1 << 30  # size of each .distcp data file
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
    from megatron.core import parallel_state as ps

    from .mcore_model import on_cpu

    with on_cpu(), tempfile.TemporaryDirectory() as tmp:
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
    from .mcore_model import build_model, transformer_config

    one = single_rank_args(ns)
    config = transformer_config(one, None)
    with torch.device("meta"):
        model = build_model(one, config, 0, 1, None)
    return model.sharded_state_dict()


def _is_tensor_entry(value: Any) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return isinstance(value, (ShardedTensor, ShardedTensorFactory))


class TorchDistWriter:
    """A torch_dist checkpoint written tensor by tensor, so memory holds a layer, not the model.

    A key of megatron-core's sharded state dict spans many tensors (all layers of a stacked key), so
    one `dist_checkpointing.save` per layer is not possible; instead each tensor is written as soon as
    it arrives, in torch.distributed.checkpoint's own file format (`torch.save` of each chunk,
    appended to `.distcp` files, with the chunk's global offsets and sizes taken from megatron-core's
    ShardedTensor for it). `close` lets `dist_checkpointing.save` write what is not a tensor (the
    common state, `_extra_state` objects), then adds the tensors' entries to its `.metadata`. The
    result loads with `dist_checkpointing.load` at any layout (tests check TP/PP/EP and logits).
    """

    def __init__(self, ns: argparse.Namespace, iteration: int | str, directory: Path) -> None:
        _quiet()
        from torch.distributed.checkpoint.metadata import Metadata

        self.ns, self.iteration, self.directory = ns, iteration, directory
        self._session = contextlib.ExitStack()
        self._session.enter_context(megatron_session())
        self.template = template(ns)
        self.metadata = Metadata(state_dict_metadata={}, storage_data={})
        self.written: set[str] = set()
        self._file: Any = None
        self._file_name = ""
        self._files = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        entry = self.template.get(name)
        if entry is None or not _is_tensor_entry(entry):
            raise ConversionError(f"torch_dist: megatron-core's model has no {name}")
        if tuple(tensor.shape) != tuple(entry.data.shape):
            raise ConversionError(f"torch_dist: {name} has shape {list(tensor.shape)}, megatron-core expects {list(entry.data.shape)}")
        entry.data = tensor
        shards = list(nested_values(entry.build())) if isinstance(entry, ShardedTensorFactory) else [entry]
        for shard in shards:
            self._write_chunk(shard)
        entry.data = None
        self.written.add(name)

    def _write_chunk(self, shard: Any) -> None:
        """One chunk: `torch.save` of the local tensor with the prepended axes, as megatron-core's
        torch_dist strategy hands it to torch.distributed.checkpoint."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )

        if self._file is None or self._file.tell() >= FILE_BYTES:
            self._next_file()
        sizes = (1,) * shard.prepend_axis_num + tuple(shard.local_shape)
        data = shard.data.reshape(sizes)
        if data.untyped_storage().nbytes() != data.nbytes or data.storage_offset():
            data = data.clone()  # torch.save writes a view's whole storage
        offset = self._file.tell()
        torch.save(data, self._file)
        offsets = torch.Size(shard.global_offset)
        entry = self.metadata.state_dict_metadata.get(shard.key)
        if entry is None:
            entry = TensorStorageMetadata(TensorProperties(dtype=data.dtype), torch.Size(shard.global_shape), [])
            self.metadata.state_dict_metadata[shard.key] = entry
        entry.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(sizes)))
        self.metadata.storage_data[MetadataIndex(shard.key, offsets)] = _StorageInfo(
            self._file_name, offset, self._file.tell() - offset)

    def _next_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file_name = f"__0_tensors{self._files}.distcp"
        self._files += 1
        self._file = open(self.directory / self._file_name, "wb")  # noqa: SIM115 - closed in _next_file / close

    def close(self) -> None:
        """Check completeness, let megatron-core write the common state and `_extra_state` objects,
        then add the tensors to its `.metadata`."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import FileSystemReader

        try:
            if self._file is not None:
                self._file.close()
            missing = [n for n, e in self.template.items() if _is_tensor_entry(e) and n not in self.written]
            if missing:
                raise ConversionError(f"torch_dist: megatron-core's model has {missing[0]}, which the conversion did not produce")
            objects = {n: e for n, e in self.template.items() if not _is_tensor_entry(e)}
            common = {"args": self.ns, "checkpoint_version": 3.0, "iteration": 0 if self.iteration == "release" else self.iteration}
            dist_checkpointing.save({"model": objects, **common}, str(self.directory), validate_access_integrity=False)
        finally:
            self._session.close()
        metadata = FileSystemReader(str(self.directory)).read_metadata()
        metadata.state_dict_metadata.update(self.metadata.state_dict_metadata)
        metadata.storage_data.update(self.metadata.storage_data)
        with open(self.directory / ".metadata", "wb") as f:
            pickle.dump(metadata, f)


def read_args(directory: Path) -> argparse.Namespace:
    """The `args` of a torch_dist checkpoint's common state."""
    _quiet()
    from megatron.core import dist_checkpointing

    # megatron-core <= 0.16 keeps the common state in common.pt; 0.17+ inside the checkpoint itself.
    legacy = (directory / COMMON).exists()
    where = directory / COMMON if legacy else directory
    try:  # megatron's own allow-list may have been reset by an enclosing safe_globals context: bring ours
        with admitted(where if legacy else None):
            common = dist_checkpointing.load_common_state_dict(str(directory))
    except ConversionError:
        raise
    except Exception as e:  # megatron raises several types for a damaged common state
        raise ConversionError(f"{where}: cannot read the common state ({type(e).__name__}: {e})") from None
    ns = common.get("args")
    if ns is None:
        raise ConversionError(f"{where}: no 'args' in the common state; cannot tell the model's architecture")
    return ns


def load(directory: Path) -> tuple[argparse.Namespace, dict[str, torch.Tensor]]:
    """The checkpoint's `args` and all its model tensors under TP1/PP1 megatron-core local names."""
    from megatron.core import dist_checkpointing

    ns = read_args(directory)
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
