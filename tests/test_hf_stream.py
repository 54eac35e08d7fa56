"""saver_hf's streamed shards: planned up front, header first, each tensor written as it arrives and not kept.
The files are byte for byte those of the writer before (which held a shard's tensors until it was full), whatever
the shard size, also when the plan's predictions (dtypes, expert chunking) were wrong and it was made again."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import struct
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_lib.engine import hf_saver
from ckpt_lib.errors import ConversionError
from ckpt_lib.io import block_file
from ckpt_lib.io.safetensors_io import INDEX_NAME, Listing, ShardedWriter, spec, split_shards
from ckpt_lib.transport import export_plan
from util import convert_inprocess, make_deepseek_model, make_hf_model, read_safetensors_dir

CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
         torch.float8_e4m3fn: "F8_E4M3", torch.bool: "BOOL"}


class HoldingWriter:
    """The writer before streaming, with plain file writes: each shard's tensors held until the next would not fit."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.shards, self.total_bytes = 0, [], 0

    def add_together(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def _flush(self) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, t in self.pending.items():
            header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        data = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in self.pending.values())
        self.shards.append((struct.pack("<Q", len(raw)) + raw + data, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count, weight_map = len(self.shards), {}
        for i, (data, names) in enumerate(self.shards):
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / name).write_bytes(data)
            weight_map.update(dict.fromkeys(names, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def groups(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Tensors of every kind a shard holds, some kept together, one larger than the smaller limits."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(12):
        rows = 1 + 7 * i
        out.append({f"w{i}": torch.randn(rows, 24, generator=gen).to(torch.bfloat16)})
        if i % 3 == 0:
            out.append({f"q{i}": torch.randn(rows, 16, generator=gen).to(torch.float8_e4m3fn),
                        f"q{i}_scale_inv": torch.rand(1 + rows // 16, 1, generator=gen)})
        if i % 4 == 1:
            out.append({f"n{i}": torch.randn(rows, generator=gen)})
    out += [{"big": torch.randn(100, 40, generator=gen)}, {"empty": torch.empty(0, 5)}, {"scalar": torch.tensor(7)},
            {"mask": torch.ones(3, dtype=torch.bool)}, {"half": torch.randn(5, 5, generator=gen).half()}]
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def reference(tmp_path: Path, tensors: list[dict[str, torch.Tensor]], max_bytes: int) -> dict[str, bytes]:
    ref = tmp_path / f"ref-{max_bytes}"
    ref.mkdir()
    old = HoldingWriter(ref, max_bytes)
    for g in tensors:
        old.add_together(g)
    old.close()
    return files(ref)


def planned(tensors: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    listing = Listing()
    for g in tensors:
        listing.add_together(g)
    return listing.groups


def stream(directory: Path, plan: list, tensors: list[dict[str, torch.Tensor]], max_bytes: int, replan=None) -> dict[str, bytes]:
    directory.mkdir()
    with ShardedWriter(directory, plan, max_bytes, checksum="sha256", replan=replan) as writer:
        for g in tensors:
            writer.add_together(g)
        shards = writer.close()
    for path, (specs, finished) in shards.items():
        assert finished.result() == hashlib.sha256(path.read_bytes()).hexdigest()  # hashed while written
        assert specs == {n: spec(t) for g in tensors for n, t in g.items() if n in specs}
    return files(directory)


@pytest.mark.parametrize("max_bytes", [1, 400, 1000, 2600, 5000, 10**9])
def test_streamed_shards_are_the_holding_writers_bytes(tmp_path, max_bytes):
    tensors = groups()
    expected = reference(tmp_path, tensors, max_bytes)
    assert stream(tmp_path / "out", planned(tensors), tensors, max_bytes) == expected
    assert (len(expected) == 1) == (max_bytes == 10**9)


def test_a_wrong_plan_is_made_again_and_the_bytes_are_the_same(tmp_path):
    """bf16 arrives where fp32 was predicted, each time only for the group at hand (as a new message kind would):
    the open shard is rewritten under its new header, whether the group belongs in the middle of it or now fits
    at its end although the plan had begun the next shard with it (a shard is kept open until then)."""
    bf16 = [torch.randn(n, dtype=torch.bfloat16) for n in (200, 200, 100, 0, 100, 300, 100)]
    tensors = [{f"t{i}": t} for i, t in enumerate(bf16)]
    tensors[3] = {"ids": torch.arange(10)}
    wrong = {1, 4, 5}  # B fits after A, E in the middle of [D, E], F after [D, E]: 1000-byte shards
    truth = planned(tensors)
    guess = planned([{n: torch.empty(t.shape, device="meta") if i in wrong else t for n, t in g.items()}
                     for i, g in enumerate(tensors)])
    assert len(split_shards(guess, 1000)) == 5 and len(split_shards(truth, 1000)) == 3
    (tmp_path / "out").mkdir()
    added, calls = [0], []

    def replan() -> list:
        calls.append(added[0])
        return truth[:added[0] + 1] + guess[added[0] + 1:]

    writer = ShardedWriter(tmp_path / "out", guess, 1000, checksum="sha256", replan=replan)
    for group in tensors:
        writer.add_together(group)
        added[0] += 1
    for path, (_, finished) in writer.close().items():
        assert finished.result() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert calls == sorted(wrong)
    assert files(tmp_path / "out") == reference(tmp_path, tensors, 1000)


def test_a_group_off_the_plan_fails_and_gives_its_buffer_back(tmp_path):
    tensors = groups()
    with pytest.raises(ConversionError, match="is not the next tensor the plan"):
        stream(tmp_path / "out", planned(tensors[:5] + tensors[6:]), tensors, 1000)
    with pytest.raises(ConversionError, match="ended before all planned tensors"):
        stream(tmp_path / "out2", planned(tensors), tensors[:-1], 1000)
    pool = block_file._buffers()
    deadline = time.monotonic() + 10
    while pool.free.qsize() < pool.made and time.monotonic() < deadline:  # writes in flight still return theirs
        time.sleep(0.01)
    assert pool.free.qsize() == pool.made  # else a later conversion in this process would wait for a buffer


@pytest.mark.parametrize("max_bytes", [1000, 10**9])
def test_the_writer_keeps_no_tensor_whatever_the_shard_size(tmp_path, max_bytes):
    """Memory is the write buffers: once added, a tensor is referenced by the caller only (the writer before held
    a whole shard), so no tensor bytes are held by the writer, with one shard or many."""
    tensors = groups()
    writer = ShardedWriter(tmp_path, planned(tensors), max_bytes)
    held: list[weakref.ref] = []
    for index in range(len(tensors)):
        group = {n: t.clone() for n, t in tensors[index].items()}
        writer.add_together(group)
        held += [weakref.ref(t) for t in group.values()]
        del group
        gc.collect()
        assert sum(r().nbytes for r in held if r() is not None) == 0
    assert len(writer.close()) == len(split_shards(planned(tensors), max_bytes))
    assert block_file._buffers().made <= block_file.BUFFERS


def shard_data_bytes(directory: Path) -> list[int]:
    sizes = []
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            sizes.append(f.stat().st_size - 8 - n)
    return sizes


def in_header_order(directory: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors import safe_open

    out = []
    for f in sorted(directory.glob("*.safetensors")):
        header = json.loads(f.read_bytes()[8:8 + struct.unpack("<Q", f.read_bytes()[:8])[0]])
        with safe_open(str(f), "pt") as st:
            out += [{name: st.get_tensor(name)} for name in header if name != "__metadata__"]
    return out


def weights(directory: Path) -> dict[str, bytes]:
    """Every output file's bytes, the manifest's description of the files and tensors for the manifest."""
    out = {n: b for n, b in files(directory).items() if n != "conversion_manifest.json"}
    doc = json.loads((directory / "conversion_manifest.json").read_text())
    out["manifest"] = json.dumps({k: doc[k] for k in ("files", "tensors")}, sort_keys=True).encode()
    return out


@pytest.fixture
def replans(monkeypatch) -> list:
    """The groups that made a ShardedWriter plan again, in this test."""
    seen: list = []
    original = ShardedWriter._replan
    monkeypatch.setattr(ShardedWriter, "_replan", lambda self, group: (seen.append(group), original(self, group))[1])
    return seen


def test_mcore_to_hf_bytes_depend_only_on_the_split(tmp_path, replans):
    """A tiny Llama through mcore TP2xPP2 back to HF: --max-shard-size values giving the same split give the same
    bytes (index and manifest included), the shards are those the holding writer writes, and the weights are exact.
    The plan from the metadata was right (nothing planned again)."""
    make_hf_model("llama", tmp_path / "hf", dtype=torch.bfloat16)
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-tensor-parallel-size", "2",
                      "--target-pipeline-parallel-size", "2")
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "a", "--max-shard-size", "30KB")
    tightest = max(shard_data_bytes(tmp_path / "a"))
    assert len(shard_data_bytes(tmp_path / "a")) > 3 and tightest < 30_000
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "b", "--max-shard-size", str(tightest))
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    expected = reference(tmp_path, in_header_order(tmp_path / "a"), 30_000)
    assert {n: b for n, b in files(tmp_path / "a").items() if n in expected} == expected
    src, out = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "a")
    assert sorted(src) == sorted(out) and all(torch.equal(src[n], out[n]) for n in src)
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "c", "--max-shard-size", "5GB")
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "d", "--max-shard-size", "1GB")
    assert weights(tmp_path / "c") == weights(tmp_path / "d") and "model.safetensors" in weights(tmp_path / "c")
    assert not replans


@pytest.mark.parametrize("fp8", [False, True])
def test_deepseek_plan_is_right_and_bytes_are_the_holding_writers(tmp_path, replans, fp8):
    """bf16 DeepSeek-V3 with MTP through mcore TP2xEP2 (router bias in fp32, MTP copies of the vocabulary tables),
    and its FP8 release layout (weights quantized as written, scales after them in the same shard)."""
    make_deepseek_model(tmp_path / "ds", dtype=torch.bfloat16)
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "ds", tmp_path / "mc", "--mtp-num-layers", "1",
                      "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2")
    flags = ["--save-fp8", "--fp8-block-size", "16"] if fp8 else []
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "out", "--max-shard-size", "40KB", *flags)
    assert not replans
    grouped: list[dict[str, torch.Tensor]] = []
    for group in in_header_order(tmp_path / "out"):  # an FP8 weight and its scales were added together
        name = next(iter(group))
        if name.endswith("_scale_inv"):
            grouped[-1].update(group)
        else:
            grouped.append(group)
    expected = reference(tmp_path, grouped, 40_000)
    assert len(expected) > 10 and {n: b for n, b in files(tmp_path / "out").items() if n in expected} == expected


def test_mixed_dtypes_and_other_expert_chunks_are_planned_again(tmp_path, monkeypatch, replans):
    """What the metadata cannot tell: fp32 norms in a bf16 model (HF -> HF), and experts sent 3 to a message while the
    saver expects 8. The plan is made again from what arrived; the bytes are those of a right prediction."""
    mixed = tmp_path / "mixed"
    make_hf_model("llama", mixed, dtype=torch.bfloat16)
    from safetensors.torch import load_file, save_file

    state = {k: v.float() if "norm" in k else v for k, v in load_file(mixed / "model.safetensors").items()}
    save_file(state, mixed / "model.safetensors", metadata={"format": "pt"})
    convert_inprocess("hf", "hf", mixed, tmp_path / "m", "--max-shard-size", "20KB")
    assert len(replans) == 2  # the first layer's norms, the final norm
    expected = reference(tmp_path, in_header_order(tmp_path / "m"), 20_000)
    assert {n: b for n, b in files(tmp_path / "m").items() if n in expected} == expected
    out = read_safetensors_dir(tmp_path / "m")
    assert sorted(out) == sorted(state) and all(torch.equal(state[n], out[n]) for n in state)

    make_deepseek_model(tmp_path / "ds", dtype=torch.bfloat16)
    flags = ["--mtp-num-layers", "1", "--experts-per-message", "3", "--max-shard-size", "50KB"]
    convert_inprocess("hf_deepseek3", "hf", tmp_path / "ds", tmp_path / "right", *flags)
    replans.clear()
    monkeypatch.setattr(hf_saver, "Observed", lambda _: export_plan.Observed(8))
    convert_inprocess("hf_deepseek3", "hf", tmp_path / "ds", tmp_path / "wrong", *flags)
    assert replans and weights(tmp_path / "wrong") == weights(tmp_path / "right")


def test_rank_file_tensors_are_read_from_the_file_not_the_map(tmp_path):
    """loader_core_ext's copy out of a memory-mapped rank file reads the bytes with preadv (no page of the map
    touched), into a contiguous slab or, through a reused buffer, into a row-parallel shard's strided slab;
    a tensor outside the map is copied and its pages left alone; gathered shards equal torch.cat's."""
    from ckpt_lib.io.megatron_io import FileMaps, load_rank_file
    from ckpt_lib.layout.sharding import COLUMN, ROW, gather

    shards = [torch.randn(512, 1024).to(torch.bfloat16) for _ in range(2)]
    torch.save({"model": {"a": shards[0], "b": shards[1]}}, tmp_path / "rank.pt")
    state = load_rank_file(tmp_path / "rank.pt")["model"]
    maps = FileMaps()
    maps.add(tmp_path / "rank.pt")
    if not maps.ranges:
        pytest.skip("no /proc/self/maps or madvise here")
    mapped = [state["a"], state["b"]]
    for rule, dim in ((COLUMN, 0), (ROW, 1)):
        full = gather(mapped, rule, "w", lambda shape, dtype: torch.empty(shape, dtype=dtype), maps.copy)
        assert torch.equal(full, torch.cat(shards, dim))
    assert maps.read_through_map == []
    with open("/proc/self/smaps") as f:  # the map's pages were never faulted in
        text = f.read()
    entry = text[text.index(str((tmp_path / "rank.pt").resolve())):]
    assert int(re.search(r"^Rss:\s+(\d+) kB", entry, re.M).group(1)) < 64
    outside = torch.randn(4, 4)
    target = torch.empty(4, 4)
    maps.copy(target, outside)
    assert torch.equal(target, outside) and maps.read_through_map == [outside]
    maps.drop_read()
    with pytest.raises(ConversionError, match="shard 1 has shape"):
        gather([shards[0], shards[1][:, :8]], COLUMN, "w", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    descriptor = maps.ranges[0][3]
    del maps
    with pytest.raises(OSError):  # the file closes with its FileMaps (in-process conversions open no more)
        os.fstat(descriptor)


def test_a_rank_file_of_the_other_byte_order_is_read_as_torch_loads_it(tmp_path):
    """torch.load swaps a big-endian file's tensors in place (private pages): those are neither the file's bytes
    nor droppable, so the loader copies them from the loaded tensor and drops nothing."""
    import zipfile

    import numpy as np

    from ckpt_lib.io.megatron_io import FileMaps, load_rank_file

    w = torch.randn(256, 1024)
    torch.save({"model": {"w": w}}, tmp_path / "little.pt")
    with zipfile.ZipFile(tmp_path / "little.pt") as zin, zipfile.ZipFile(tmp_path / "big.pt", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zout.writestr(info.filename, data)
    loaded = load_rank_file(tmp_path / "big.pt")["model"]["w"]
    maps = FileMaps()
    maps.add(tmp_path / "big.pt")
    out = torch.empty_like(w)
    maps.copy(out, loaded)
    maps.drop_read()
    assert torch.equal(out, w) and torch.equal(loaded, w)


def test_rank_file_pages_leave_the_loader_once_copied(tmp_path):
    """loader_core_ext drops the pages of rank-file tensors it has copied into a message (a mapped page read
    counts in its memory until unmapped); the tensor reads the same after, other memory is never touched."""
    from ckpt_lib.io.megatron_io import FileMaps, load_rank_file

    def file_pages() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))

    torch.save({"model": {"w": torch.randn(2048, 1024), "b": torch.randn(1000)}}, tmp_path / "rank.pt")
    w = load_rank_file(tmp_path / "rank.pt")["model"]["w"]
    maps = FileMaps()
    maps.add(tmp_path / "rank.pt")
    if not maps.ranges:
        pytest.skip("no /proc/self/maps or madvise here")
    anonymous = torch.randn(1000)
    expected, kept = w.clone(), anonymous.clone()  # w's 8 MB read through the map
    mapped = file_pages()
    maps.drop_pages([w, anonymous])
    assert mapped - file_pages() >= 7 << 20
    assert torch.equal(w, expected) and torch.equal(anonymous, kept)
