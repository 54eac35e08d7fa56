"""Safetensors reading (lazy, memory-mapped, index-aware, validated) and sharded writing.

Reading copies each tensor once, with `preadv`, from the page cache straight into shared memory
(for tensors of 1 MiB or more): putting it on the converter's multiprocessing queue then passes a
handle instead of copying again, and no file mapping keeps the whole model resident in the
loader. Headers are validated up front so a truncated or lying file fails before any output is
written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import ConversionError
from .block_file import BLOCK, BlockFile

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024
SHARED_MIN_BYTES = 1 << 20


def empty_shared(shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory when large enough: the queue to the saver then passes
    it by handle instead of copying it (torch.multiprocessing moves other tensors into shared memory).
    Its pages come from the loader's SharedPool when there is one."""
    shape = tuple(shape)
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    if nbytes < SHARED_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    storage = _pool.storage(nbytes) if _pool is not None else torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


POOL_BYTES = 512 << 20


class SharedPool:
    """Shared-memory buffers used again once nobody can see them, kept mapped in this process. Filling fresh
    pages costs the loader more than the copy into them (1 GB/s against 4-5 GB/s into pages used before, 2-core
    VM), and mapping a buffer again costs a page fault per 64 KB and an unmap.

    A lent buffer is idle again when (1) no tensor in this process uses it any more (the pool's reference is
    the storage's only one), (2) the saver has since received a message put after that moment, so it has
    unpickled every message that could carry the buffer, and (3) the saver's process no longer maps it (its
    /proc maps; in-process savers are covered by (1)). At most `budget` bytes are pooled.
    """

    def __init__(self, saver_pid: int, messages: Callable[[], tuple[int, int]], budget: int = POOL_BYTES) -> None:
        self.saver_pid, self.messages, self.budget = saver_pid, messages, budget
        self.idle: dict[int, list[torch.UntypedStorage]] = {}  # bytes -> idle buffers
        self.lent: list[_Lent] = []
        self.held = 0
        self.reused = self.fresh = self.fresh_bytes = 0
        self._maps: tuple[int, set[int] | None] | None = None  # (messages taken, the saver's mapped inodes then)

    def storage(self, nbytes: int) -> torch.UntypedStorage:
        self._collect()
        if self.idle.get(nbytes):
            self.reused += 1
            storage = self.idle[nbytes].pop()
        else:
            storage = torch.UntypedStorage._new_shared(nbytes)
            self.fresh, self.fresh_bytes = self.fresh + 1, self.fresh_bytes + nbytes
            self._make_room(nbytes)
            if self.held + nbytes > self.budget:
                return storage  # not pooled
            self.held += nbytes
        self.lent.append(_Lent(storage, nbytes, os.fstat(storage._share_fd_cpu_()[0]).st_ino))
        return storage

    def _make_room(self, nbytes: int) -> None:
        for size, storages in self.idle.items():
            while storages and self.held + nbytes > self.budget:
                storages.pop()
                self.held -= size

    def _collect(self) -> None:
        sent, taken = self.messages()
        mapped: set[int] | None = None
        still: list[_Lent] = []
        for lent in self.lent:
            if lent.since is None and torch._C._storage_Use_Count(lent.storage._cdata) == 1:
                lent.since = sent
            if lent.since is None or taken <= lent.since:
                still.append(lent)
                continue
            if mapped is None:
                mapped = self._saver_maps(taken)
            if mapped is None or lent.inode in mapped:
                still.append(lent)
            else:
                self.idle.setdefault(lent.nbytes, []).append(lent.storage)
        self.lent = still

    def _saver_maps(self, taken: int) -> set[int] | None:
        """The saver's mapped inodes, read again only once it has taken another message (reading its maps costs
        1-2 ms, once per tensor before). A reading made once it had taken `taken` messages still proves (3) for
        every buffer whose (2) holds at `taken`: the saver maps no buffer again after unpickling its messages."""
        if self.saver_pid == os.getpid():
            return set()  # an in-process saver: (1) covers it (this process maps every pooled buffer)
        if self._maps is None or self._maps[0] != taken:
            self._maps = (taken, _mapped_inodes(self.saver_pid))
        return self._maps[1]

    def close(self) -> None:
        self.lent, self.idle, self.held = [], {}, 0


class _Lent:
    def __init__(self, storage: torch.UntypedStorage, nbytes: int, inode: int) -> None:
        self.storage, self.nbytes, self.inode = storage, nbytes, inode
        self.since: int | None = None  # messages put when this process stopped using the buffer


def _mapped_inodes(pid: int) -> set[int] | None:
    """Inodes of the files a process maps (None when it cannot be read: then nothing is idle)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {int(fields[4]) for fields in (line.split(maxsplit=5) for line in f) if len(fields) > 4}
    except (OSError, ValueError):
        return None


_pool: SharedPool | None = None  # the running loader's (see `pooled`)


@contextlib.contextmanager
def pooled(pool: SharedPool | None) -> Iterator[None]:
    """Take `empty_shared`'s pages from `pool` while a loader runs (runtime.run_loader, under a driver
    that names the saver's process); fresh shared memory otherwise."""
    global _pool
    previous, _pool = _pool, pool
    try:
        yield
    finally:
        _pool = previous


class SafetensorsFile:
    """One safetensors file: validated header, tensors served from a private memory map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ConversionError(f"{path}: truncated or corrupt safetensors header (header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: tensor {name!r} has an invalid header entry") from None
            numel = 1
            for d in shape:
                numel *= d
            itemsize = torch.empty((), dtype=dtype).element_size()
            if min(shape, default=1) < 0 or end - begin != numel * itemsize or begin < 0:
                raise ConversionError(f"{path}: tensor {name!r} header size does not match its shape {list(shape)}")
            if end > data_size:
                raise ConversionError(f"{path}: truncated file: tensor {name!r} ends at byte {end} of {data_size}")
            self.entries[name] = (dtype, shape, begin, end)
        self._fd: int | None = None

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        out = empty_shared((end - begin,), torch.uint8)
        self._read(name, [memoryview(out.numpy())])
        return out.view(dtype).reshape(shape)

    def read_into(self, name: str, dest: torch.Tensor) -> None:
        """Read a tensor straight into `dest`, a possibly strided view laid out like it (row-major)."""
        dtype, shape, begin, end = self.entries[name]
        if dest.dtype != dtype or dest.numel() * dest.element_size() != end - begin:
            raise ConversionError(f"{self.path}: tensor {name!r} ({dtype}, {list(shape)}) cannot be read into "
                                  f"{dest.dtype} {list(dest.shape)}")
        if dest.dim() == 0 or dest.stride(-1) != 1:
            dest.copy_(self.get(name).reshape(dest.shape))
            return
        self._read(name, _contiguous_blocks(dest.view(torch.uint8).numpy()))

    def _read(self, name: str, buffers: list[memoryview], start: int = 0) -> None:
        """Fill `buffers` in order from the tensor's bytes (from byte `start` of the tensor): one preadv
        per 1024 buffers, from the page cache straight into place."""
        offset = self.data_start + self.entries[name][2] + start
        buffers = [b for b in buffers if len(b)]
        if buffers and self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        while buffers:
            n = os.preadv(self._fd, buffers[:1024], offset)
            if n <= 0:
                raise ConversionError(f"{self.path}: file ended while reading tensor {name!r}")
            offset += n
            while buffers and n >= len(buffers[0]):
                n -= len(buffers.pop(0))
            if n:
                buffers[0] = buffers[0][n:]


def _contiguous_blocks(array: Any) -> list[memoryview]:
    """The row-major contiguous pieces of a strided numpy view, in order."""
    if array.flags.c_contiguous:
        return [memoryview(array.reshape(-1))]
    return [block for sub in array for block in _contiguous_blocks(sub)]


class Pending:
    """A tensor not read yet: shape and dtype now, bytes on demand. Joins (fused QKV, stacked experts)
    read each part straight into its place in the joined tensor, which saves a copy and a buffer of
    fresh pages per part."""

    is_meta = False

    def __init__(self, file: SafetensorsFile, name: str, shape: Iterable[int] | None = None) -> None:
        self.file, self.name = file, name
        self.dtype = file.entries[name][0]
        self.shape = torch.Size(file.entries[name][1] if shape is None else shape)

    def dim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape: int) -> Pending:
        return self.with_shape(torch.empty(self.shape, device="meta").reshape(*shape).shape)

    def unsqueeze(self, dim: int) -> Pending:
        shape = list(self.shape)
        shape.insert(dim % (len(shape) + 1), 1)
        return self.with_shape(shape)

    def with_shape(self, shape: Iterable[int]) -> Pending:
        """The same tensor seen with another shape of as many elements (a subclass keeps its kind)."""
        view = copy.copy(self)
        view.shape = torch.Size(shape)
        return view

    def read_into(self, dest: torch.Tensor) -> None:
        self.file.read_into(self.name, dest)

    def load(self) -> torch.Tensor:
        return self.file.get(self.name).reshape(self.shape)

    def rows(self, first: int, count: int) -> PendingRows:
        """Rows [first, first+count) of dimension 0, still unread (only their bytes are read)."""
        if not 0 <= first <= first + count <= self.shape[0]:
            raise ConversionError(f"tensor {self.name!r}: rows {first}..{first + count} out of {self.shape[0]}")
        row_bytes = self.shape[1:].numel() * torch.empty((), dtype=self.dtype).element_size()
        part = PendingRows(self.file, self.name, (count, *self.shape[1:]))
        part.start = getattr(self, "start", 0) + first * row_bytes
        return part


class PendingRows(Pending):
    """A run of whole rows of a stored tensor: read from byte `start` of its data."""

    start = 0

    def read_into(self, dest: torch.Tensor) -> None:
        if dest.dtype != self.dtype or dest.shape.numel() != self.shape.numel():
            raise ConversionError(f"tensor {self.name!r} rows cannot be read into {dest.dtype} {list(dest.shape)}")
        if not dest.is_contiguous():
            dest.copy_(self.load().reshape(dest.shape))
            return
        self.file._read(self.name, [memoryview(dest.reshape(-1).view(torch.uint8).numpy())], self.start)

    def load(self) -> torch.Tensor:
        out = empty_shared(tuple(self.shape), self.dtype)
        self.read_into(out)
        return out


class SafetensorsSource:
    """All tensors of a checkpoint spread over safetensors files; tracks which were read."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = [SafetensorsFile(Path(p)) for p in files]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                if name in self.where:
                    raise ConversionError(f"tensor {name!r} appears in both {self.where[name].path} and {f.path}")
                self.where[name] = f
        self.used: set[str] = set()

    @classmethod
    def from_dir(cls, directory: str | Path) -> SafetensorsSource:
        """Open an HF-style directory: by its index when present, else every *.safetensors file."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConversionError(f"--load-dir {directory}: not a directory")
        index = directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: invalid index ({e})") from None
            names = sorted(set(weight_map.values()))
            for n in names:
                if not (directory / n).exists():
                    raise ConversionError(f"{index}: lists shard {n}, which is missing")
            source = cls(directory / n for n in names)
            for name, shard in weight_map.items():
                if name not in source.where or source.where[name].path.name != shard:
                    raise ConversionError(f"{index}: tensor {name!r} is not in {shard}")
            return source
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"--load-dir {directory}: no .safetensors files found")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.where[name].entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
        self.used.add(name)
        return self.where[name].get(name)

    def pending(self, name: str) -> Pending:
        """`get` deferred: the bytes are read where the tensor is needed (see Pending)."""
        if name not in self.where:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
        self.used.add(name)
        return Pending(self.where[name], name)

    def unused(self) -> list[str]:
        return sorted(set(self.where) - self.used)

    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file straight from tensor memory (no serialisation copy). Returns bytes."""
    size, finished = start_file(path, tensors, metadata)
    finished.result()
    return size


class Spec(NamedTuple):
    """What a safetensors header says of a tensor (a stand-in for it where its data is not there yet)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def spec(tensor: Any) -> Spec:
    """The Spec of a tensor, meta tensor, Spec or anything written like one (`fp8.Fp8Weight`)."""
    return Spec(tensor.dtype, tuple(tensor.shape))


def encode_header(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's first bytes (length, JSON header, padding) for tensors stored in this order:
    only their dtypes and shapes count, so a header can be written before any data exists."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise ConversionError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def start_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               checksum: str | None = None) -> tuple[int, Future[str | None]]:
    """`write_file` whose end is written in the background (`block_file`): its size now, and a
    future done when the file is complete (its result the `checksum` digest)."""
    head = encode_header(tensors, metadata)
    f = BlockFile(path, checksum)
    try:
        f.write(head)
        for t in tensors.values():
            if t.numel():
                f.put(t.detach())
        size, finished = f.close()
    except BaseException:
        f.discard()  # its buffer back to the pool
        raise
    assert size == len(head) + sum(t.nbytes for t in tensors.values())
    return size, finished


Group = dict[str, Spec]  # tensors kept in one shard, in order (an FP8 weight and its scales)


def split_shards(groups: Iterable[Group], max_shard_bytes: int) -> list[list[Group]]:
    """Groups in order, a new shard begun when the next one would take the current past `max_shard_bytes`
    (a group larger than that gets a shard of its own); at least one shard, empty for no groups."""
    shards: list[list[Group]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group.values())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += nbytes
    return shards


class Listing:
    """Stands in for a ShardedWriter in a dry run: lists the groups it is given, the plan a ShardedWriter needs."""

    def __init__(self) -> None:
        self.groups: list[Group] = []

    def add(self, name: str, tensor: Any) -> None:
        self.add_together({name: tensor})

    def add_together(self, tensors: dict[str, Any]) -> None:
        self.groups.append({name: spec(t) for name, t in tensors.items()})


class ShardedWriter:
    """HF-style shards of at most `max_shard_bytes`, streamed: planned from the whole sequence of tensor
    groups the caller will add (`plan`), so each shard's header is written first and every tensor is copied
    into the write buffers (`block_file`) as it is added and not kept: memory is the buffers, whatever the
    shard size. The files are those a writer holding each shard's tensors until it was full would write.

    A group that differs from the plan (a dtype the metadata could not tell) asks `replan` for the whole
    sequence again, now right about it: the shards already complete cannot change (the split of a sequence
    depends only on what came before); the open shard, if its header changes, is rewritten from its file.
    A shard stays open until the group after it arrives, since that group's size decides where it ends."""

    def __init__(self, directory: Path, plan: list[Group], max_shard_bytes: int, checksum: str | None = None,
                 replan: Callable[[], list[Group]] | None = None) -> None:
        self.directory, self.max_shard_bytes, self.checksum, self.replan = directory, max_shard_bytes, checksum, replan
        self.shards = split_shards(plan, max_shard_bytes)
        self.index = 0  # the open (or next) shard
        self.position = 0  # groups of it written
        self.written = 0  # its data bytes written
        self.file: BlockFile | None = None
        self.done: list[tuple[Path, dict[str, Spec], Future[str | None]]] = []

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is not None and self.file is not None:
            self.file.discard()  # a failed conversion: the open file's buffer back to the pool

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_together({name: tensor})

    def add_together(self, tensors: dict[str, Any]) -> None:
        """Tensors kept in one shard, in this order (an FP8 weight and its scales), the next group of the plan:
        each with dtype, shape and nbytes, its data a tensor or produced as it is written (`BlockFile.put`)."""
        group = {name: spec(t) for name, t in tensors.items()}
        if list(group.items()) != list(self._next().items()):
            self._replan(group)
        if self.position == len(self.shards[self.index]):
            self._finish()
        if self.file is None:
            self.file = self._open(self.shards[self.index])
        for t in tensors.values():
            if t.numel():
                self.file.put(t.detach())
        self.position += 1
        self.written += sum(t.nbytes for t in group.values())

    def _next(self) -> Group:
        if self.position < len(self.shards[self.index]):
            return self.shards[self.index][self.position]
        return self.shards[self.index + 1][0] if self.index + 1 < len(self.shards) else {}

    def _path(self) -> Path:
        """The open shard's file until `close` names it."""
        return self.directory / f".shard-{self.index:05d}.tmp"

    def _open(self, shard: list[Group]) -> BlockFile:
        f = BlockFile(self._path(), self.checksum)
        f.write(encode_header({n: t for group in shard for n, t in group.items()}))
        return f

    def _finish(self) -> None:
        """End the open shard (its last group written, the next one confirmed to begin the next shard)."""
        assert self.file is not None or not self.shards[self.index]
        if self.file is None:
            self.file = self._open([])  # no tensors at all: one empty file, as save_pretrained writes
        _, finished = self.file.close()
        self.done.append((self._path(), {n: t for g in self.shards[self.index] for n, t in g.items()}, finished))
        self.file, self.index, self.position, self.written = None, self.index + 1, 0, 0

    def _replan(self, group: Group) -> None:
        flat = [g for shard in self.shards for g in shard]
        done = sum(len(shard) for shard in self.shards[:self.index]) + self.position
        groups = self.replan() if self.replan is not None else flat
        if _listed(groups[:done + 1]) != _listed(flat[:done] + [group]):
            raise ConversionError(f"{_named(group)} is not the next tensor the plan of the output has "
                                  f"({_named(flat[done]) if done < len(flat) else 'none'})")
        shards = split_shards(groups, self.max_shard_bytes)
        changed = _listed(shards[self.index]) != _listed(self.shards[self.index])
        self.shards = shards
        if changed and self.file is not None:
            self._rewrite()

    def _rewrite(self) -> None:
        """Write the open shard again under its new header, its data so far copied from the old file."""
        assert self.file is not None
        old = self._path().with_suffix(".old")
        size, finished = self.file.close()
        finished.result()
        os.replace(self._path(), old)
        self.file = self._open(self.shards[self.index])
        chunk = torch.empty(BLOCK, dtype=torch.uint8)
        with open(old, "rb") as f:
            f.seek(size - self.written)
            while n := f.readinto(memoryview(chunk.numpy())):
                self.file.put(chunk[:n])
        old.unlink()

    def close(self) -> dict[Path, tuple[dict[str, Spec], Future[str | None]]]:
        """Name the shards like `save_pretrained`, write the index when there are several; returns
        each shard's path with its tensors (as Specs, for the manifest) and its finished write
        (the `checksum` digest)."""
        if self.position < len(self.shards[self.index]) or self.index + 1 < len(self.shards):
            raise ConversionError(f"the output ended before all planned tensors were written ({_named(self._next())} next)")
        self._finish()
        count = len(self.done)
        final: dict[Path, tuple[dict[str, Spec], Future[str | None]]] = {}
        weight_map: dict[str, str] = {}
        for i, (tmp, tensors, finished) in enumerate(self.done):
            finished.result()  # complete (or its write error raised) before it is named
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(tmp, self.directory / name)
            final[self.directory / name] = tensors, finished
            weight_map.update(dict.fromkeys(tensors, name))
        if count > 1:
            total = sum(t.nbytes for tensors, _ in final.values() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return final


def _listed(groups: list[Group]) -> list[list[tuple[str, Spec]]]:
    """Groups compared in order (dicts compare equal in any order, headers do not)."""
    return [list(group.items()) for group in groups]


def _named(group: Group) -> str:
    name, t = next(iter(group.items()))
    return f"tensor {name!r} ({str(t.dtype).removeprefix('torch.')} {list(t.shape)})"


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB', or a plain byte count."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(text).strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        return int(float(num) * units[unit])
    except (KeyError, ValueError):
        raise ConversionError(f"--max-shard-size: cannot parse {text!r} (e.g. 5GB, 500MB)") from None
