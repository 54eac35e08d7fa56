"""MindSpore Transformers training output read as one checkpoint, without MindSpore and without a merged copy.

Two layouts a training run leaves behind:
- Checkpoint 1.0: `checkpoint/rank_N/{prefix}_rank_N-{epoch}_{step}.safetensors` (each rank's slices) and the
  parallel strategy, protobuf `ParallelStrategyMap` (mindspore/train/node_strategy.proto): per rank
  `strategy/ckpt_strategy_rank_N.ckpt` (its pipeline stage's parameters) or one merged file (pipeline stages
  merged by `merge_pipeline_strategys` name parameters `{stage}-{name}`). A layout gives the device matrix
  (stage-local ranks, row-major), per tensor dimension the device axes splitting it (counted from the
  right, -1 none; several axes: the first most significant), and optimizer parallel: dimension 0 of the
  slice cut again into `opt_weight_shard_size` pieces over the device axes that do not split the tensor
  (see `Layout._opt_index`). Stage s holds ranks [s * devices, (s + 1) * devices).
- Checkpoint 2.0 (mindformers' `checkpoint/` package): `iteration_XXXXXXXX/metadata.json` gives per
  parameter the global shape, `axis_fragmentations` and chunks (`global_offset` = [slice id, row-major over
  the fragment grid], `local_shape`), and `storage_data` the files holding each chunk under the
  parameter's name; `latest_checkpointed_iteration.txt` names the iteration.

Each full tensor is assembled on demand from the slices straight into the buffer that goes to the saver
(`AssembledPending`), so memory stays bounded by one message. Every slice is checked against the global shape
before anything is sent: a missing rank, a slice whose shape the layout does not predict, gaps and overlaps
are errors naming the parameter and ranks; replicas are compared while reading.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError
from ..families import mindspore as ms
from ..io.safetensors_io import Pending, SafetensorsFile, empty_shared

RANK_FILE = re.compile(r"_rank_(\d+)-(\d+)_(\d+)\.safetensors$")
ITERATION_DIR = re.compile(r"^iteration_(\d+)$")


# --- protobuf wire format: the few ParallelStrategyMap messages, read without the protobuf package ---

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one message: varints as int, length-delimited as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            yield number, buf[pos:pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _ints(buf: bytes) -> list[int]:
    """A `repeated int` field 1 (packed or not), as signed 64-bit."""
    out: list[int] = []
    for number, value in _fields(buf):
        if number != 1:
            continue
        if isinstance(value, int):
            out.append(value)
        else:
            pos = 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                out.append(item)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in out]


@dataclass(frozen=True)
class Layout:
    """One parameter's place in a training run's device mesh."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]  # per tensor dimension: device axes (from the right) splitting it
    opt_size: int  # optimizer parallel: dimension 0 of the slice cut again into this many pieces (0 or 1: not)
    stage: int

    @property
    def devices(self) -> int:
        n = 1
        for d in self.dev_matrix:
            n *= d
        return n

    def parts(self, dim: int) -> int:
        n = 1
        for axis in self.tensor_map[dim]:
            n *= self.dev_matrix[-1 - axis]
        return n * (self.opt_size if dim == 0 and self.opt_size > 1 else 1)

    def slice_of(self, rank: int, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(start, shape) of the slice `rank` holds of a tensor of global `shape`; None if not its stage."""
        local = rank - self.stage * self.devices
        if not 0 <= local < self.devices:
            return None
        if len(self.tensor_map) != len(shape):
            raise ConversionError(f"the strategy maps {len(self.tensor_map)} dimensions, the tensor has {len(shape)}")
        coords, rest = [], local
        for d in reversed(self.dev_matrix):
            coords.append(rest % d)
            rest //= d  # coords[k]: the coordinate on device axis k, counted from the right
        start, size = [], []
        for dim, full in enumerate(shape):
            index = 0
            for axis in self.tensor_map[dim]:
                index = index * self.dev_matrix[-1 - axis] + coords[axis]
            if dim == 0 and self.opt_size > 1:
                index = index * self.opt_size + self._opt_index(coords)
            parts = self.parts(dim)
            if full % parts:
                raise ConversionError(f"dimension {dim} of size {full} does not split into {parts} parts")
            start.append(index * (full // parts))
            size.append(full // parts)
        return tuple(start), tuple(size)

    def _opt_index(self, coords: list[int]) -> int:
        """The optimizer-shard piece: the device axes that do not split the tensor, innermost first, taken
        until `opt_size` is reached (the last one's inner part when it is larger), outer axes most significant
        (MindSpore's `_construct_tensor_layout_for_opt_shard`)."""
        used = {a for axes in self.tensor_map for a in axes}
        index, radix, remaining = 0, 1, self.opt_size
        for axis in range(len(self.dev_matrix)):
            size = self.dev_matrix[-1 - axis]
            if axis in used or size == 1 or remaining == 1:
                continue
            take = min(size, remaining)
            if size % take or remaining % take:
                raise ConversionError(f"optimizer shard size {self.opt_size} does not fit device matrix {list(self.dev_matrix)}")
            index += (coords[axis] % take) * radix
            radix *= take
            remaining //= take
        if remaining != 1:
            raise ConversionError(f"optimizer shard size {self.opt_size} exceeds the replicas of device matrix {list(self.dev_matrix)}")
        return index


def _layout(buf: bytes, stage: int) -> Layout:
    dev: list[list[int]] = []
    maps: list[list[int]] = []
    opt_size = 0
    for number, value in _fields(buf):
        if number == 1:
            dev.append(_ints(value))
        elif number == 2:
            maps.append(_ints(value))
        elif number == 3 and _ints(value):
            raise ValueError("uneven splits (param_split_shape) are not supported")
        elif number == 5 and value:
            raise ValueError("field-split layouts are not supported")
        elif number == 7:
            opt_size = value
    if len(dev) != 1 or not maps:
        raise ValueError("layout without one device matrix and a tensor map")
    # One TensorMap: one device axis (or -1) per tensor dimension; several: one per dimension, its axes.
    per_dim = [[a] for a in maps[0]] if len(maps) == 1 else [m for m in maps if m]
    return Layout(tuple(dev[0]), tuple(tuple(a for a in axes if a != -1) for axes in per_dim), opt_size, stage)


def read_strategy(path: Path) -> dict[str, Layout]:
    """Parameter name -> layout from a strategy file (per rank or pipeline-merged)."""
    try:
        current = 0
        stages: list[int] = []
        items: list[bytes] = []
        for number, value in _fields(path.read_bytes()):
            if number == 1:
                current = value
            elif number == 2:
                stages += [s for n, op in _fields(value) if n == 2 for k, s in _fields(op) if k == 1]
            elif number == 3:
                items.append(value)
        stage = stages[0] if stages else current
        layouts: dict[str, Layout] = {}
        for item in items:
            fields = dict(_fields(item))
            name = fields[1].decode()
            merged = re.match(r"^(\d+)-(.+)$", name)
            if merged:
                name = merged[2]
            try:
                layouts[name] = _layout(fields[2], int(merged[1]) if merged else stage)
            except ValueError as e:
                raise ConversionError(f"{path}: parameter {name!r}: {e}") from None
        return layouts
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not a MindSpore parallel strategy file ({e})") from None


# --- slices and their assembly ---

@dataclass(frozen=True)
class Piece:
    """One stored slice: where it sits in the global tensor, and which rank's file holds it."""

    file: SafetensorsFile
    name: str
    rank: str
    start: tuple[int, ...]
    shape: tuple[int, ...]


class AssembledPending(Pending):
    """A global tensor made of slices, read on demand straight into place (see safetensors_io.Pending);
    replicas of a slice are compared with the first as they are read."""

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: list[Piece]) -> None:
        self.name, self.dtype, self.shape = name, dtype, torch.Size(shape)
        self.base = torch.Size(shape)  # the stored global shape (`shape` may be a reshaped view of it)
        self.pieces = pieces
        self.first_row = 0  # rows [first_row, first_row + base[0]) of the stored tensor (see `rows`)

    def read_into(self, dest: torch.Tensor) -> None:
        if dest.dtype != self.dtype or dest.shape.numel() != self.base.numel():
            raise ConversionError(f"tensor {self.name!r} ({self.dtype}, {list(self.base)}) cannot be read into "
                                  f"{dest.dtype} {list(dest.shape)}")
        if dest.shape != self.base:
            if not dest.is_contiguous():
                dest.copy_(self.load().reshape(dest.shape))
                return
            dest = dest.view(self.base)
        done: dict[tuple, str] = {}
        for piece in self.pieces:
            lo = max(piece.start[0], self.first_row)
            hi = min(piece.start[0] + piece.shape[0], self.first_row + self.base[0])
            if lo >= hi:
                continue
            region = dest.narrow(0, lo - self.first_row, hi - lo)
            for dim in range(1, len(piece.shape)):
                region = region.narrow(dim, piece.start[dim], piece.shape[dim])
            source = Pending(piece.file, piece.name).rows(lo - piece.start[0], hi - lo)
            key = (lo, hi, piece.start[1:])
            if key not in done:
                source.read_into(region)
                done[key] = piece.rank
            elif not torch.equal(source.load(), region):
                raise ConversionError(f"tensor {self.name!r}: the replicas in {done[key]} and {piece.rank} differ "
                                      f"(slice at {list(piece.start)})")

    def load(self) -> torch.Tensor:
        out = empty_shared(tuple(self.base), self.dtype)
        self.read_into(out)
        return out.reshape(self.shape)

    def rows(self, first: int, count: int) -> AssembledPending:
        if not 0 <= first <= first + count <= self.base[0]:
            raise ConversionError(f"tensor {self.name!r}: rows {first}..{first + count} out of {self.base[0]}")
        part = AssembledPending(self.name, self.dtype, (count, *self.base[1:]), self.pieces)
        part.first_row = self.first_row + first
        return part


def check_cover(name: str, shape: tuple[int, ...], pieces: list[Piece]) -> None:
    """The slices tile the global tensor: no gap, no partial overlap (equal regions are replicas)."""
    regions: dict[tuple, Piece] = {}
    for p in pieces:
        if any(s < 0 or s + n > full for s, n, full in zip(p.start, p.shape, shape)) or len(p.shape) != len(shape):
            raise ConversionError(f"tensor {name!r}: the slice of {p.rank} ({list(p.shape)} at {list(p.start)}) lies outside "
                                  f"the global shape {list(shape)}")
        regions.setdefault((p.start, p.shape), p)
    unique = list(regions.values())
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            if all(sa < sb + nb and sb < sa + na for sa, na, sb, nb in zip(a.start, a.shape, b.start, b.shape)):
                raise ConversionError(f"tensor {name!r}: the slices of {a.rank} and {b.rank} overlap "
                                      f"({list(a.shape)} at {list(a.start)}, {list(b.shape)} at {list(b.start)})")
    covered = sum(torch.Size(p.shape).numel() for p in unique)
    if covered != torch.Size(shape).numel():
        raise ConversionError(f"tensor {name!r}: the slices in {', '.join(sorted({p.rank for p in pieces}))} cover {covered} of "
                              f"{torch.Size(shape).numel()} elements of {list(shape)} (a rank file or chunk is missing)")


class ShardedSource:
    """SafetensorsSource's interface over a training run's slices: weights served whole (`pending`),
    non-weight entries (optimizer states, counters) listed but never read."""

    def __init__(self, tensors: dict[str, AssembledPending], skipped: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 files: list[SafetensorsFile], what: str) -> None:
        self.tensors, self.skipped, self.files, self.what = tensors, skipped, files, what
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.skipped

    def names(self) -> list[str]:
        return list(self.tensors) + list(self.skipped)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape) if name in self.tensors else self.skipped[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype if name in self.tensors else self.skipped[name][1]

    def pending(self, name: str) -> AssembledPending:
        if name not in self.tensors:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
        self.used.add(name)
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        return self.pending(name).load()

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)

    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)


# --- Checkpoint 1.0 ---

def is_checkpoint_1(path: Path) -> bool:
    return path.is_dir() and (any(d.is_dir() and d.name.startswith("rank_") for d in path.iterdir())
                              or (path / "checkpoint").is_dir() and any((path / "checkpoint").glob("rank_*")))


def _rank_dirs(root: Path) -> dict[int, Path]:
    dirs = {}
    for d in root.iterdir():
        if d.is_dir() and re.fullmatch(r"rank_\d+", d.name):
            dirs[int(d.name[5:])] = d
    return dirs


def _strategies(strategy: Path, ranks: int) -> dict[int, dict[str, Layout]]:
    """Each rank's layouts: its own `ckpt_strategy_rank_N.ckpt`, or one file for all."""
    if strategy.is_file():
        one = read_strategy(strategy)
        return dict.fromkeys(range(ranks), one)
    per_rank = {int(m[1]): p for p in strategy.glob("*.ckpt") if (m := re.search(r"_rank_(\d+)\.ckpt$", p.name))}
    if per_rank:
        missing = [r for r in range(ranks) if r not in per_rank]
        if missing:
            raise ConversionError(f"{strategy}: no strategy file for rank {missing[0]} (ckpt_strategy_rank_{missing[0]}.ckpt)")
        return {r: read_strategy(per_rank[r]) for r in range(ranks)}
    files = sorted(strategy.glob("*.ckpt"))
    if len(files) != 1:
        raise ConversionError(f"{strategy}: expected ckpt_strategy_rank_N.ckpt files or one merged strategy file, found "
                              f"{len(files)} .ckpt files")
    return _strategies(files[0], ranks)


def find_strategy(load_dir: Path, given: str | None) -> Path:
    if given:
        path = Path(given)
        if not path.exists():
            raise ConversionError(f"--strategy-path {given}: no such file or directory")
        return path
    for candidate in (load_dir / "strategy", load_dir.parent / "strategy"):
        if candidate.is_dir() and any(candidate.glob("*.ckpt")):
            return candidate
    raise ConversionError(f"--load-dir {load_dir} holds per-rank (distributed) weights but no strategy/ directory with "
                          "MindSpore strategy files was found beside it: pass --strategy-path (a ckpt_strategy_rank_N.ckpt "
                          "directory or one merged strategy file)")


def open_checkpoint_1(load_dir: Path, strategy_path: str | None) -> ShardedSource:
    root = load_dir / "checkpoint" if (load_dir / "checkpoint").is_dir() else load_dir
    rank_dirs = _rank_dirs(root)
    files: dict[int, dict[tuple[int, int], Path]] = {}
    for rank, d in rank_dirs.items():
        for p in d.glob("*.safetensors"):
            m = RANK_FILE.search(p.name)
            if m and int(m[1]) == rank:
                files.setdefault(rank, {})[(int(m[2]), int(m[3]))] = p
    if not rank_dirs:
        raise ConversionError(f"{root}: no rank_N directories")
    strategy = find_strategy(load_dir, strategy_path)
    per_rank = [int(m[1]) for p in (strategy.glob("*.ckpt") if strategy.is_dir() else ())
                if (m := re.search(r"_rank_(\d+)\.ckpt$", p.name))]
    world = max([*rank_dirs, *per_rank]) + 1
    layouts = _strategies(strategy, world)
    spanned = max(((layout.stage + 1) * layout.devices for lay in layouts.values() for layout in lay.values()), default=1)
    if spanned > world:
        world = spanned
        layouts = _strategies(strategy, world)
    missing = [r for r in range(world) if r not in files]
    if missing:
        raise ConversionError(f"{root}: rank_{missing[0]} has no checkpoint file ({{prefix}}_rank_{missing[0]}-{{epoch}}_{{step}}"
                              f".safetensors); the run has {world} ranks")
    steps = set.intersection(*(set(f) for f in files.values()))
    if not steps:
        raise ConversionError(f"{root}: the ranks share no training step (rank_0 has {sorted(files[0])[-1]}, ...)")
    step = max(steps)
    opened = {r: SafetensorsFile(files[r][step]) for r in range(world)}
    print(f"loader_core_mf: Checkpoint 1.0, {world} ranks, epoch {step[0]} step {step[1]} "
          f"({opened[0].path.name}), strategy {strategy}", flush=True)
    tensors: dict[str, AssembledPending] = {}
    skipped: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    holders: dict[str, list[int]] = {}
    for r, f in opened.items():
        for name in f.entries:
            holders.setdefault(name, []).append(r)
    for name, ranks in holders.items():
        dtype, shape0 = opened[ranks[0]].entries[name][:2]
        if ms.is_non_weight(name):
            skipped[name] = (shape0, dtype)
            continue
        layout = layouts[ranks[0]].get(name)
        if layout is None:  # not in the strategy (e.g. not trainable): every holder has it whole
            odd = next((r for r in ranks if opened[r].entries[name][1] != shape0), None)
            if odd is not None:
                raise ConversionError(f"tensor {name!r} is not in the strategy ({strategy}) but rank_{ranks[0]} and rank_{odd} "
                                      f"hold {list(shape0)} and {list(opened[odd].entries[name][1])}")
            shape, pieces = shape0, [Piece(opened[r], name, f"rank_{r}", (0,) * len(shape0), shape0) for r in ranks]
        else:
            shape = tuple(s * layout.parts(d) for d, s in enumerate(shape0))
            stage_ranks = [r for r in range(world) if layout.slice_of(r, shape) is not None]
            absent = [r for r in stage_ranks if r not in ranks]
            if absent:
                raise ConversionError(f"tensor {name!r} is missing from rank_{absent[0]} ({opened[absent[0]].path}), "
                                      f"which its strategy says holds a slice")
            pieces = []
            for r in ranks:
                placed = layout.slice_of(r, shape)
                local = opened[r].entries[name][1]
                if placed is None or placed[1] != local:
                    raise ConversionError(f"tensor {name!r}: rank_{r} holds {list(local)} but the strategy ({strategy}) gives "
                                          f"{list(placed[1]) if placed else 'nothing'} of {list(shape)} there "
                                          "(strategy file from another run?)")
                pieces.append(Piece(opened[r], name, f"rank_{r}", *placed))
        if any(opened[r].entries[name][0] != dtype for r in ranks):
            raise ConversionError(f"tensor {name!r}: the ranks hold it in different dtypes")
        check_cover(name, shape, pieces)
        tensors[name] = AssembledPending(name, dtype, shape, pieces)
    return ShardedSource(tensors, skipped, list(opened.values()), "Checkpoint 1.0")


# --- Checkpoint 2.0 ---

def iteration_dir(load_dir: Path) -> Path | None:
    """The iteration directory of a Checkpoint 2.0 root (by its tracker file) or the directory itself."""
    tracker = load_dir / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise ConversionError(f"{tracker}: not an iteration number ({text!r})")
        path = load_dir / f"iteration_{int(text):08d}"
        if not path.is_dir():
            raise ConversionError(f"{tracker} names iteration {int(text)}, but {path} is missing")
        return path
    if ITERATION_DIR.match(load_dir.name) and (load_dir / "metadata.json").is_file():
        return load_dir
    return None


def open_checkpoint_2(path: Path) -> ShardedSource:
    meta_file = path / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text())
        state, storage = meta["state_dict_metadata"], meta["storage_data"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{meta_file}: not a mindformers Checkpoint 2.0 metadata file ({e})") from None
    where: dict[tuple[str, int], list[str]] = {}
    for shard_id, stored in storage.items():
        try:
            name, (slice_id,) = ast.literal_eval(shard_id)
            where[(name, int(slice_id))] = [s["file_name"] for s in stored]
        except (ValueError, SyntaxError, TypeError, KeyError):
            raise ConversionError(f"{meta_file}: invalid storage_data entry {shard_id!r}") from None
    opened: dict[str, SafetensorsFile] = {}

    def file(name: str) -> SafetensorsFile:
        if name not in opened:
            if not (path / name).is_file():
                raise ConversionError(f"{path / name} is missing (metadata.json lists it)")
            opened[name] = SafetensorsFile(path / name)
        return opened[name]

    tensors: dict[str, AssembledPending] = {}
    skipped: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, info in state.items():
        shape = tuple(int(s) for s in info["global_shape"])
        if (info.get("layout") or {}).get("interleaved_parallel"):
            raise ConversionError(f"{meta_file}: tensor {name!r} has an interleaved_parallel layout, which is not supported")
        grid = [int(f) for f in info.get("axis_fragmentations") or [1] * len(shape)]
        pieces = []
        for chunk in info["chunk"]:
            (slice_id,) = chunk["global_offset"]
            local = tuple(int(s) for s in chunk["local_shape"])
            coords, rest = [], int(slice_id)
            for parts in reversed(grid):
                coords.append(rest % parts)
                rest //= parts
            start = tuple(c * n for c, n in zip(reversed(coords), local))
            files = where.get((name, int(slice_id)))
            if not files:
                raise ConversionError(f"{meta_file}: no file holds chunk {slice_id} of tensor {name!r}")
            for fname in files:
                f = file(fname)
                if name not in f.entries:
                    raise ConversionError(f"tensor {name!r} is missing from {f.path} (metadata.json says it holds chunk {slice_id})")
                if f.entries[name][1] != local:
                    raise ConversionError(f"tensor {name!r}: {f.path.name} holds {list(f.entries[name][1])}, metadata.json says "
                                          f"{list(local)}")
                pieces.append(Piece(f, name, fname, start, local))
        dtype = pieces[0].file.entries[name][0]
        if ms.is_non_weight(name):
            skipped[name] = (shape, dtype)
            continue
        check_cover(name, shape, pieces)
        tensors[name] = AssembledPending(name, dtype, shape, pieces)
    print(f"loader_core_mf: Checkpoint 2.0, {path.name}, {len(opened)} files", flush=True)
    return ShardedSource(tensors, skipped, list(opened.values()), "Checkpoint 2.0")
