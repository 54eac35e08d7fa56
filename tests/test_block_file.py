"""block_file: what reaches the disk is exactly the bytes given, in order, whatever the strides, joins,
block boundaries and interleaving of files; the sha256 is the file's; write errors are not lost."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import threading
from pathlib import Path

import pytest
import torch

from ckpt_lib.io import block_file
from ckpt_lib.io.block_file import BlockFile
from ckpt_lib.io.megatron_io import RankFileWriter
from ckpt_lib.layout.sharding import Joined, cast, materialize


def _bytes(value: torch.Tensor | Joined) -> bytes:
    tensor = value.materialize() if isinstance(value, Joined) else value
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _pieces(gen: torch.Generator) -> list[bytes | torch.Tensor | Joined]:
    wide = torch.randn(300, 1000, generator=gen).to(torch.bfloat16)
    gate, up = torch.randn(2, 3, 40, 50, generator=gen).unbind(0)
    return [b"header-1", wide, wide[:, 500:], b"x" * 5, wide[7:19, 3:900:7], Joined([gate[1], up[1]]),
            Joined([gate, up], dim=1)[2], torch.tensor(3.5), torch.ones(5, dtype=torch.bool),
            torch.arange(100_000)[::3], b"", b"end"]


def _write(f: BlockFile | io.BytesIO, piece: bytes | torch.Tensor | Joined) -> None:
    if isinstance(piece, bytes):
        f.write(piece)
    elif isinstance(f, BlockFile):
        f.put(piece)
    else:
        f.write(_bytes(piece))


@pytest.mark.parametrize("block", [block_file.BLOCK, 3 * block_file.ALIGN, 64 << 10])
def test_interleaved_files_hold_exactly_their_bytes(tmp_path, monkeypatch, block):
    """Small blocks put boundaries inside rows, headers and joins; two files share the buffers."""
    monkeypatch.setattr(block_file, "BLOCK", block)
    monkeypatch.setattr(block_file, "_SHARED", None)  # buffers of this size
    gen = torch.Generator().manual_seed(0)
    files = [BlockFile(tmp_path / f"f{i}.bin", checksum="sha256") for i in range(2)]
    expected = [io.BytesIO() for _ in files]
    for piece in _pieces(gen):
        for f, want in zip(files, expected):
            _write(f, piece)
            _write(want, piece)
            f.park()
    done = [f.close() for f in files]
    for (size, finished), want, f in zip(done, expected, files):
        digest = finished.result()  # the file is complete now, not before
        data = Path(f.path).read_bytes()
        assert size == len(data) and data == want.getvalue()
        assert digest == hashlib.sha256(data).hexdigest()


def test_without_checksum_and_without_o_direct(tmp_path, monkeypatch):
    """Where O_DIRECT is refused (tmpfs), the same buffers go through the page cache."""
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    f = BlockFile(tmp_path / "plain.bin", checksum=None)
    tensor = torch.randn(1000, 333, generator=torch.Generator().manual_seed(1))
    f.put(tensor[:, 1:])
    size, finished = f.close()
    assert finished.result() is None
    assert (tmp_path / "plain.bin").read_bytes() == _bytes(tensor[:, 1:]) and size == tensor[:, 1:].nbytes


def test_a_failed_write_is_raised_with_the_file_name(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    f = BlockFile(tmp_path / "lost.bin", checksum="sha256")
    with pytest.raises(OSError, match="lost.bin.*No space left"):  # from the next buffer, close, or the file's end
        f.put(torch.zeros(2 * block_file.BLOCK // 4, dtype=torch.int32))  # the first block is written in the background
        f.close()[1].result()
    with pytest.raises(OSError, match="lost.bin"):
        f.put(torch.zeros(1))


def test_open_files_do_not_keep_buffers(tmp_path, monkeypatch):
    """More open files than buffers (rank files of a stage, each parked when the next one's turn
    comes), and a record that fails half way: no file keeps a buffer, nothing waits forever for one."""
    monkeypatch.setattr(block_file, "_SHARED", None)
    writers = [RankFileWriter(tmp_path / f"r{i}.pt", 1) for i in range(3 * block_file.BUFFERS)]
    broken = Joined([torch.ones(600_000), torch.empty(10, device="meta")])  # fails after 2.4 MB are copied

    def convert() -> None:
        for step in range(3):
            for i, w in enumerate(writers):
                w.add(0, f"w{step}", torch.full((1000,), float(i)))
                w.park()
        with pytest.raises(NotImplementedError, match="meta"):
            writers[0].add(0, "broken", broken)
        for w in writers[1:]:  # the first one is broken: the conversion would stop here
            w.close(argparse.Namespace(), 1)
            w.finished.result()

    worker = threading.Thread(target=convert, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "waited for a buffer held by another file"
    pool = block_file._buffers()
    assert pool.free.qsize() == pool.made
    for i, w in enumerate(writers[1:], start=1):
        model = torch.load(w.path, weights_only=False)["model"]
        assert all(torch.equal(model[f"w{s}"], torch.full((1000,), float(i))) for s in range(3))


@pytest.mark.parametrize("block", [block_file.BLOCK, 3 * block_file.ALIGN])
def test_cast_while_copying_gives_the_bytes_of_a_converted_copy(tmp_path, monkeypatch, block):
    """`--params-dtype` converts in the copy into the buffer: the rank file is byte for byte the one written from
    tensors converted beforehand, for contiguous, row-strided, joined, scalar and long-row values, both ways."""
    monkeypatch.setattr(block_file, "BLOCK", block)
    monkeypatch.setattr(block_file, "_SHARED", None)
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(64, 1000, generator=gen)
    gate, up = torch.randn(2, 30, 20, generator=gen).unbind(0)
    sources = {"contiguous": wide, "row_shard": wide[:, 500:], "column_shard": wide[16:48], "scalar": torch.tensor(1.25),
               "vector": torch.randn(7, generator=gen), "joined": Joined([gate[10:20], up[10:20]]),
               "long_rows": torch.randn(2, 3 * block // 4, generator=gen)[:, 1:], "stack": torch.randn(3, 5, 8, generator=gen)[:, :, :4],
               "bf16_to_fp32": wide[:, :300].to(torch.bfloat16), "fp32_kept": wide[:3]}
    files = {}
    for lazy in (True, False):
        writer = RankFileWriter(tmp_path / f"{lazy}.pt", 1)
        for name, value in sources.items():
            dtype = torch.float32 if name in ("bf16_to_fp32", "fp32_kept") else torch.bfloat16
            converted = cast(value, dtype)
            writer.add(0, name, converted if lazy else materialize(converted).contiguous())
            writer.add(0, name + "_ints", torch.arange(3, dtype=torch.int8))  # odd offsets between records
        writer.close(argparse.Namespace(), 1)
        writer.finished.result()
        files[lazy] = (tmp_path / f"{lazy}.pt").read_bytes()
    assert files[True] == files[False]
    model = torch.load(tmp_path / "True.pt", weights_only=False)["model"]
    assert model["row_shard"].dtype == torch.bfloat16 and torch.equal(model["row_shard"], wide[:, 500:].to(torch.bfloat16))
    assert torch.equal(model["joined"], torch.cat([gate[10:20], up[10:20]]).to(torch.bfloat16))
