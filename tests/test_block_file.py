"""block_file: what reaches the disk is exactly the bytes given, in order, whatever the strides, joins,
block boundaries and interleaving of files; the sha256 is the file's; write errors are not lost."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch

import util  # noqa: F401  (puts plugins/ on sys.path)
from ckpt_lib import block_file
from ckpt_lib.block_file import BlockFile
from ckpt_lib.sharding import Joined


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
    files = [BlockFile(tmp_path / f"f{i}.bin", checksum=True) for i in range(2)]
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
    f = BlockFile(tmp_path / "plain.bin", checksum=False)
    tensor = torch.randn(1000, 333, generator=torch.Generator().manual_seed(1))
    f.put(tensor[:, 1:])
    size, finished = f.close()
    assert finished.result() is None
    assert (tmp_path / "plain.bin").read_bytes() == _bytes(tensor[:, 1:]) and size == tensor[:, 1:].nbytes


def test_a_failed_write_is_raised_with_the_file_name(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    f = BlockFile(tmp_path / "lost.bin", checksum=True)
    f.put(torch.zeros(block_file.BLOCK // 4 + 1, dtype=torch.int32))  # fills a block: written in the background
    with pytest.raises(OSError, match="lost.bin.*No space left"):  # from close, or from the file's end
        f.close()[1].result()
    with pytest.raises(OSError, match="lost.bin"):
        f.put(torch.zeros(1))
