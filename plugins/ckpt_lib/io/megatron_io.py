"""Megatron legacy `torch` checkpoints: directory layout, rank files, the `args` Namespace.

Layout (REFERENCE §2): `latest_checkpointed_iteration.txt`; `iter_{it:07d}/` (or `release/`);
`mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt` holding `model` (or `model0..` per
virtual chunk), `args`, `checkpoint_version` and `iteration`.

Reading never runs arbitrary pickles: files are loaded with `weights_only=True` and memory-mapped;
the only globals admitted are argparse.Namespace and opaque stand-ins for Megatron's own enum
and config classes found in `args`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import mmap
import os
import pickle
import re
import resource
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..layout.sharding import Cast, Joined
from .block_file import BlockFile

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


class _StorageRef:
    """A storage already written to the zip, named by its record key."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _WrittenTensor:
    """Pickles as the tensor torch.save would have written, without holding its data."""

    def __init__(self, storage: _StorageRef, shape: torch.Size) -> None:
        self.storage, self.shape, self.dtype = storage, shape, storage.dtype

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        stride = torch.empty(self.shape, device="meta").stride()
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    """torch.save's persistent ids: ("storage", type, key, location, numel)."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class RankFileWriter:
    """One rank file written tensor by tensor, so that memory holds a layer, never a stage.

    The file is the zip torch.save writes (records `data/<key>` per storage and `data.pkl` for the
    object, here written last: torch.load finds records by name), loadable with plain `torch.load`,
    `mmap=True` included (records stay 64-byte aligned). CRC32 is off, as torch.save allows: it
    halves the write speed and torch.load does not need it. Tensor data goes through
    `block_file.BlockFile`: views (row-parallel shards) and `Joined` parts are copied straight into
    its reused buffers. The file is complete once `finished` is done (its result: the digest).
    """

    def __init__(self, path: Path, num_chunks: int, checksum: str | None = "sha256") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = BlockFile(path, checksum)
        self._zip: Any = torch._C.PyTorchFileWriter(self._file, False, 64)
        self._records = 0
        self.chunks: list[dict[str, Any]] = [{} for _ in range(num_chunks)]
        self.finished: Future[str | None] | None = None

    def add(self, chunk: int, name: str, value: Any) -> None:
        """Write a tensor's bytes now, straight from its memory; keep only a reference."""
        if isinstance(value, torch.Tensor | Joined | Cast):
            if isinstance(value, torch.Tensor):
                value = value.detach()
            ref = _StorageRef(str(self._records), value.dtype, value.shape.numel())
            self._file.pending = value
            try:
                self._zip.write_record_metadata(f"data/{ref.key}", value.nbytes)
            except BaseException:
                self.abandon()
                raise
            self._records += 1
            value = _WrittenTensor(ref, value.shape)
        self.chunks[chunk][name] = value

    def park(self) -> None:
        """Other rank files are written next: give the shared write buffer back."""
        self._file.park()

    def abandon(self) -> None:
        """The conversion failed: stop writing this file. The zip is ended here, errors ignored, so
        that torch's writer does not try again when it is destroyed (an exception there aborts the
        process instead of the one clear error line)."""
        self._file.discard()
        if hasattr(self, "_zip"):
            with contextlib.suppress(Exception):
                self._zip.write_end_of_file()
            del self._zip

    def described(self) -> dict[str, Any]:
        """Everything written, by its path in the file (`model/...` or `model0/...`)."""
        prefixes = ["model/"] if len(self.chunks) == 1 else [f"model{i}/" for i in range(len(self.chunks))]
        return {p + name: value for p, chunk in zip(prefixes, self.chunks) for name, value in chunk.items()}

    def close(self, args: argparse.Namespace, iteration: int | str) -> int:
        """Write the object (`model` for one chunk, `model0..` for several) and end the zip; the size."""
        state: dict[str, Any] = {"args": args, "checkpoint_version": 3.0, "iteration": 0 if iteration == "release" else iteration}
        if len(self.chunks) == 1:
            state["model"] = self.chunks[0]
        else:
            state.update({f"model{i}": c for i, c in enumerate(self.chunks)})
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(state)
        data = buffer.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        del self._zip
        size, self.finished = self._file.close()
        return size


def raise_open_file_limit(needed: int) -> None:
    """Rank files of a stage are open together (TP x EP x VPP ranks): lift the soft limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def write_tracker(root: Path, iteration: int | str) -> None:
    (root / TRACKER).write_text(f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n")


class _Opaque:
    """Stand-in for a Megatron class pickled inside `args` (enums, dataclasses): kept, never run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_ALLOW_LIST = threading.Lock()  # torch's allow-list is process-wide; verify reads from two threads


@contextlib.contextmanager
def admitted(path: Path | None) -> Iterator[None]:
    """`torch.load(..., weights_only=True)` of `path` may unpickle what `safe_globals_for` admits
    (None: a pickle that cannot be scanned first, e.g. inside a torch_dist checkpoint: the plain set)."""
    with _ALLOW_LIST, torch.serialization.safe_globals(safe_globals_for(path)):
        yield


def safe_globals_for(path: Path | None) -> list[Any]:
    """What a Megatron checkpoint may pickle besides tensors: `args`, numpy's RNG state inside
    `rng_state` (training checkpoints), and Megatron's enums/dataclasses inside `args`, admitted as
    inert stand-ins. Anything else is refused."""
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype,
                          (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
                          (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    known = {"argparse.Namespace", "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
             "numpy.core.multiarray._reconstruct"} | {f"numpy.dtypes.{n}" for n in dir(np.dtypes)}
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if path is not None else ():
        if name in known:
            continue
        if not name.startswith(("megatron.", "mindspeed", "transformer_engine.", "enum.")):
            raise ConversionError(f"{path}: refusing to unpickle {name}; it is not a plain Megatron checkpoint")
        allowed.append((type(name.rsplit(".", 1)[-1], (_Opaque,), {}), name))
    # torch's safe_globals context removes on exit what it was given: leave megatron's registrations alone
    registered = set(torch.serialization.get_safe_globals())
    return [g for g in allowed if (g[0] if isinstance(g, tuple) else g) not in registered]


MADV_DONTNEED = 4  # Linux


class FileMaps:
    """Where this process maps the rank files it opened, to read tensors without the map and to drop pages read
    through it. `copy` reads a tensor's bytes from its file straight into place with `preadv` (one kernel copy;
    through the map each 64 KB costs a page fault, and the pages an unmap). A page read through a memory map counts
    in the process's memory (RSS, PSS) until the file is unmapped; dropped with MADV_DONTNEED it stays in the page
    cache and is mapped again if read again. torch maps them MAP_PRIVATE and nothing writes into a loaded tensor,
    so no page dropped holds data of its own; only addresses inside a recorded file mapping are ever dropped
    (never anonymous or shared memory)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, int, int]] = []  # (low, high, file offset of low, descriptor)
        self.page = mmap.PAGESIZE
        self.read_through_map: list[torch.Tensor] = []  # tensors `copy` read through the map, until `drop_read`
        self.scratch = torch.empty(0, dtype=torch.uint8)
        self._madvise = _libc_madvise()
        self._fds: list[int] = []
        weakref.finalize(self, _close_all, self._fds)  # the loader's files close with it (in-process runs too)

    def add(self, path: Path) -> None:
        """Record the mappings of a file just opened (none where /proc or madvise is not available)."""
        if self._madvise is None or not _native_byte_order(path):
            return
        name = str(path.resolve())
        try:
            with open("/proc/self/maps") as f:
                found = [fields for line in f if len(fields := line.split(maxsplit=5)) == 6 and fields[5].rstrip("\n") == name]
            if found:
                raise_open_file_limit(len(self.ranges) + len(found))
                fd = os.open(name, os.O_RDONLY)
                self._fds.append(fd)
        except OSError:
            return
        for fields in found:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            self.ranges.append((low, high, int(fields[2], 16), fd))

    def _mapping(self, start: int, end: int) -> tuple[int, int, int, int] | None:
        for mapping in self.ranges:
            if mapping[0] <= start and end <= mapping[1] and start < end:
                return mapping
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """`dst.copy_(src)`, read from the file when `src` is a contiguous tensor in a recorded mapping: straight
        into a contiguous `dst`, else (a row-parallel shard's slab) through a small reused buffer."""
        if dst.dtype == src.dtype and dst.shape == src.shape and src.is_contiguous():
            nbytes = src.numel() * src.element_size()
            mapping = self._mapping(src.data_ptr(), src.data_ptr() + nbytes)
            if mapping is not None:
                into = dst if dst.is_contiguous() else self._scratch(nbytes)
                offset, view = mapping[2] + src.data_ptr() - mapping[0], memoryview(into.reshape(-1).view(torch.uint8).numpy())
                while len(view):
                    n = os.preadv(mapping[3], [view], offset)
                    if n <= 0:
                        raise ConversionError(f"a rank file ended while reading a tensor of shape {list(src.shape)}")
                    view, offset = view[n:], offset + n
                if into is not dst:
                    dst.copy_(into.view(dst.dtype).view(dst.shape))
                return
        dst.copy_(src)
        self.read_through_map.append(src)

    def _scratch(self, nbytes: int) -> torch.Tensor:
        if self.scratch.numel() < nbytes:
            self.scratch = torch.empty(nbytes, dtype=torch.uint8)
        return self.scratch[:nbytes]

    def drop_read(self) -> None:
        """Drop the pages of the tensors `copy` read through the map since the last call."""
        self.drop_pages(self.read_through_map)
        self.read_through_map = []

    def drop_pages(self, tensors: Iterable[torch.Tensor]) -> None:
        """Drop the pages holding these tensors' data (whole pages, edges shared with neighbours included)."""
        for t in tensors:
            storage = t.untyped_storage()
            start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            mapping = self._mapping(start, end)
            if mapping is not None:
                low, high = mapping[:2]
                first, last = max(low, start // self.page * self.page), min(high, -(-end // self.page) * self.page)
                self._madvise(first, last - first, MADV_DONTNEED)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _native_byte_order(path: Path) -> bool:
    """Whether torch.load left the file's tensor bytes as they are: a file saved on a machine of the other byte
    order is swapped in place (its pages are then private copies, neither the file's bytes nor droppable)."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        if reader.has_record("byteorder"):
            return bytes(reader.get_record("byteorder")) == sys.byteorder.encode()
    except RuntimeError:
        return False
    return torch.serialization.get_default_load_endianness() in (None, torch.serialization.LoadEndianness.NATIVE)


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def load_rank_file(path: Path) -> dict[str, Any]:
    """Memory-map a rank file; tensors stay on disk until touched."""
    if not path.is_file():
        raise ConversionError(f"{path}: missing rank file")
    try:
        with admitted(path):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except ConversionError:
        raise
    except Exception as e:  # torch raises several types for corrupt zips and pickles
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: cannot read checkpoint ({first})") from None


def find_iteration_dir(load_dir: Path) -> tuple[Path, int | str]:
    """The directory named by the tracker file (or the only iteration directory present)."""
    if not load_dir.is_dir():
        raise ConversionError(f"--load-dir {load_dir}: not a directory")
    tracker = load_dir / TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        iteration: int | str = "release" if text == "release" else int(text)
        path = load_dir / iteration_dir_name(iteration)
        if not path.is_dir():
            raise ConversionError(f"{tracker} names iteration {text}, but {path} is missing")
        return path, iteration
    candidates = sorted(p for p in load_dir.iterdir() if p.is_dir() and (p.name == "release" or p.name.startswith("iter_")))
    if len(candidates) != 1:
        raise ConversionError(f"--load-dir {load_dir}: no {TRACKER} and {len(candidates)} iteration directories")
    name = candidates[0].name
    return candidates[0], "release" if name == "release" else int(name[5:])


def rank_grid(iteration_dir: Path) -> dict[tuple[int, int, int], Path]:
    """(tp, pp, ep) -> rank file for every `mp_rank_*` directory, checked to be a full grid.

    With one suffix the name alone is ambiguous (`mp_rank_00_001` is PP rank 1, or EP rank 1 when
    PP is 1); the checkpoint's own `args.pipeline_model_parallel_size` decides, as in Megatron.
    """
    found: dict[tuple[int, int | None, int | None], Path] = {}
    for d in iteration_dir.iterdir():
        m = RANK_DIR.match(d.name)
        if m and d.is_dir():
            found[(int(m[1]), None if m[2] is None else int(m[2]), None if m[3] is None else int(m[3]))] = d / RANK_FILE
    if not found:
        raise ConversionError(f"{iteration_dir}: no mp_rank_* directories")
    single_suffix = all(k[1] is not None and k[2] is None for k in found)
    suffix_is_ep = False
    if single_suffix:
        args = load_rank_file(next(iter(found.values()))).get("args")
        suffix_is_ep = getattr(args, "pipeline_model_parallel_size", 2) == 1
    grid: dict[tuple[int, int, int], Path] = {}
    for (tp, a, b), path in found.items():
        pp, ep = (0, a or 0) if suffix_is_ep else (a or 0, b or 0)
        grid[(tp, pp, ep)] = path
    sizes = [1 + max(k[i] for k in grid) for i in range(3)]
    for tp in range(sizes[0]):
        for pp in range(sizes[1]):
            for ep in range(sizes[2]):
                if (tp, pp, ep) not in grid:
                    raise ConversionError(f"{iteration_dir}: missing {rank_dir_name(tp, pp, ep, sizes[1], sizes[2])}")
    return grid
