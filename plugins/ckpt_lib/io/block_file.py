"""Output files written through a few reused, page-aligned buffers, with O_DIRECT where the file system allows.

Why: writing through the page cache faults in one new page per 4 KiB of output, and a row-parallel
shard needs a contiguous copy first, in more new pages. Touching new memory is the dearest thing a
conversion does on a VM whose freed pages go back to the host (measured here: 0.4-1.5 GB/s, against
5 GB/s into memory used before). Here every tensor, strided or joined, is copied once into one of
a few buffers that are used again and again; one background thread writes each full buffer to the
device directly and another hashes it (sha256 or blake3, in file order), side by side: nothing is read back.
Where O_DIRECT is refused (tmpfs, some network file systems) the same buffers go through the page
cache. Every file ends with fsync, so an output committed by rename survives a power loss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..layout.sharding import Cast, Joined
from .manifest import hasher

ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of every common logical block size
BLOCK = 16 << 20
BUFFERS = 4  # one being filled, the rest being hashed or written: 64 MiB in all


class _Buffers:
    """The shared buffers, one thread that writes them and one that hashes them (each in submission
    order, so that a file's blocks are hashed in file order), side by side."""

    def __init__(self) -> None:
        self.free: queue.Queue[tuple[mmap.mmap, torch.Tensor]] = queue.Queue()
        self.made = 0
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="block-writer")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="block-hash")

    def take(self) -> tuple[mmap.mmap, torch.Tensor]:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            if self.made < BUFFERS:
                self.made += 1
                buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
                return buf, torch.frombuffer(buf, dtype=torch.uint8)
        return self.free.get()


class _InFlight:
    """A buffer out with the background threads: back in the pool when the last of them is done."""

    def __init__(self, pool: _Buffers, buffer: tuple[mmap.mmap, torch.Tensor], users: int) -> None:
        self.pool, self.buffer, self.users, self.lock = pool, buffer, users, threading.Lock()

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.pool.free.put(self.buffer)


_SHARED: _Buffers | None = None
_SHARED_LOCK = threading.Lock()


def _buffers() -> _Buffers:
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = _Buffers()
        return _SHARED


def _forget_in_child() -> None:
    global _SHARED
    _SHARED = None  # a forked child has the buffers but not the thread


os.register_at_fork(after_in_child=_forget_in_child)


class BlockFile:
    """A file written front to back: `write` for bytes, `put` for a tensor's data (any strides, or
    `Joined`, or `Cast`, or an object whose `chunks()` yields its data's pieces in order); a file object for torch's zip writer, whose `seek(n, SEEK_CUR)` places the pending tensor."""

    def __init__(self, path: Path, checksum: str | None) -> None:
        """`checksum`: the digest to hash the file with as it is written (`manifest.CHECKSUMS`), or None."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)  # a data file: the umask decides, never executable
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, flags, 0o666)
        self.path = path
        self.digest = hasher(checksum) if checksum else None
        self.pool = _buffers()
        self.buffer: tuple[mmap.mmap, torch.Tensor] | None = None
        self.fill = 0  # bytes in the buffer
        self.offset = 0  # file offset of the buffer's first byte
        self.tail = b""  # bytes past the last aligned boundary, kept while the buffer is lent out
        self.pending: torch.Tensor | Joined | Cast | None = None
        self.error: BaseException | None = None
        self.discarded = False

    # -- file object protocol used by torch._C.PyTorchFileWriter
    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.discarded:
            return len(view)
        done = 0
        while done < len(view):
            buf = self._space()
            n = min(len(view) - done, BLOCK - self.fill)
            buf[0][self.fill:self.fill + n] = view[done:done + n]
            self._advance(n)
            done += n
        return len(view)

    def seek(self, size: int, whence: int) -> int:
        """torch writes a record's header, then skips its data: the pending tensor fills the gap."""
        value, self.pending = self.pending, None
        if self.discarded:
            return 0
        if whence != os.SEEK_CUR or value is None or value.nbytes != size:
            raise ValueError(f"{self.path}: record data of {size} bytes without a matching tensor")
        self.put(value)
        return self.offset + self.fill

    def flush(self) -> None:
        pass

    # -- tensors
    def put(self, value: torch.Tensor | Joined | Cast) -> None:
        if self.discarded:
            return
        if isinstance(value, Cast):
            self._put_cast(value.source, value.dtype)
            return
        if isinstance(value, Joined):
            if value.dim != 0:
                raise ValueError("Joined: only dim 0 joins are written as they are")
            for part in value.parts:
                self.put(part)
            return
        if not isinstance(value, torch.Tensor):  # computed as it is written (fp8.Fp8Weight): its pieces in order
            for piece in value.chunks():
                self.put(piece)
            return
        if value.is_contiguous():
            self._put_bytes(value.reshape(-1).view(torch.uint8))
            return
        if value.stride(-1) != 1:  # no byte rows to copy from (never in a shard): one temporary copy
            self._put_bytes(value.contiguous().reshape(-1).view(torch.uint8))
            return
        rows_of_bytes = value.view(torch.uint8)  # a view: row-parallel shards keep their rows' bytes together
        row = rows_of_bytes[0].numel()
        if row > BLOCK // 4:
            for item in rows_of_bytes:
                self.put(item)
            return
        self._put_rows(rows_of_bytes, torch.uint8, row)

    def _put_cast(self, source: torch.Tensor, dtype: torch.dtype) -> None:
        """`source`'s values converted to `dtype` by the copy into the buffers, in rows of its last dimension
        (a row-parallel shard's rows are strided). Tensors start 64-byte aligned in a rank file and blocks
        end at multiples of every item size, so each copy's target is aligned for `dtype`."""
        if source.dim() == 0:
            source = source.reshape(1)
        rows = source.flatten(0, -2) if source.dim() > 1 else source.reshape(1, -1)  # a view for 2-D shards
        row = rows.shape[1] * dtype.itemsize
        if row > BLOCK // 4:
            for item in rows:
                flat = item  # one contiguous row, in pieces that fit the buffer
                done = 0
                while done < flat.numel():
                    buf = self._space()
                    n = min(flat.numel() - done, (BLOCK - self.fill) // dtype.itemsize)
                    buf[1][self.fill:self.fill + n * dtype.itemsize].view(dtype).copy_(flat[done:done + n])
                    self._advance(n * dtype.itemsize)
                    done += n
            return
        self._put_rows(rows, dtype, row)

    def _put_rows(self, rows: torch.Tensor, dtype: torch.dtype, row: int) -> None:
        """`rows` ([count, ...], each `row` bytes once in `dtype`) copied, and converted if their dtype differs,
        into the buffers as many whole rows at a time as fit."""
        done = 0
        while done < rows.shape[0]:
            buf = self._space()
            count = min(rows.shape[0] - done, (BLOCK - self.fill) // row)
            if count == 0:
                self._send(self.fill)  # too little room left for one row
                continue
            target = buf[1][self.fill:self.fill + count * row].view(dtype).view(count, *rows.shape[1:])
            target.copy_(rows[done:done + count])
            self._advance(count * row)
            done += count

    def _put_bytes(self, flat: torch.Tensor) -> None:
        done = 0
        while done < flat.numel():
            buf = self._space()
            n = min(flat.numel() - done, BLOCK - self.fill)
            buf[1][self.fill:self.fill + n].copy_(flat[done:done + n])
            self._advance(n)
            done += n

    # -- buffers
    def _space(self) -> tuple[mmap.mmap, torch.Tensor]:
        self._raise_error()
        if self.buffer is None:
            self.buffer = self.pool.take()
            self.buffer[0][:len(self.tail)] = self.tail
            self.fill, self.tail = len(self.tail), b""
        return self.buffer

    def _advance(self, n: int) -> None:
        self.fill += n
        if self.fill == BLOCK:
            self._send(BLOCK)

    def _send(self, upto: int) -> None:
        """Hand the buffer's first `upto` bytes (rounded down to ALIGN) to the writer thread; keep the rest."""
        assert self.buffer is not None
        aligned = upto // ALIGN * ALIGN
        buf, self.buffer = self.buffer, None
        self.tail = bytes(buf[0][aligned:self.fill])
        if aligned:
            self._hand_over(buf, aligned, aligned)
        else:
            self.pool.free.put(buf)
        self.offset += aligned
        self.fill = 0

    def _hand_over(self, buf: tuple[mmap.mmap, torch.Tensor], valid: int, length: int) -> Future[None] | None:
        """Hash the first `valid` bytes and write `length` (ALIGN-padded) at the buffer's offset, in
        the background; the hashing's future."""
        lent = _InFlight(self.pool, buf, 2 if self.digest is not None else 1)
        hashed = None
        if self.digest is not None:
            hashed = self.pool.hasher.submit(self._hash_block, lent, valid)
        self.pool.writer.submit(self._write_block, lent, self.offset, length)
        return hashed

    def park(self) -> None:
        """Other files are written next (the rank files of a stage take turns): send what is filled
        and give the buffer back, keeping the unaligned end (< ALIGN bytes) here."""
        if self.buffer is not None:
            self._send(self.fill)

    def discard(self) -> None:
        """A failed conversion: drop whatever comes next, give the buffer back, close the descriptor
        once the writes already queued are done."""
        if self.discarded:
            return
        self.discarded = True
        if self.buffer is not None:
            self.pool.free.put(self.buffer)
            self.buffer = None
        try:
            self.pool.writer.submit(os.close, self.fd)
        except RuntimeError:  # the interpreter is shutting down: no more background work
            os.close(self.fd)

    def close(self) -> tuple[int, Future[str | None]]:
        """Write what is left and end the file (in the background); the size now, the digest later."""
        buf = self._space()
        size, valid = self.offset + self.fill, self.fill
        self.buffer = None
        hashed = self._hand_over(buf, valid, -(-valid // ALIGN) * ALIGN)
        return size, self.pool.writer.submit(self._finish, size, hashed)

    def _hash_block(self, lent: _InFlight, valid: int) -> None:
        try:
            assert self.digest is not None
            with memoryview(lent.buffer[0]) as view:
                self.digest.update(view[:valid])
        finally:
            lent.release()

    def _write_block(self, lent: _InFlight, offset: int, length: int) -> None:
        try:
            if self.error is None and length:
                with memoryview(lent.buffer[0]) as view:
                    self._pwrite(view[:length], offset)
        except BaseException as e:  # surfaced by the next call from the converter
            self.error = e
        finally:
            lent.release()

    def _finish(self, size: int, hashed: Future[None] | None) -> str | None:
        try:
            self._raise_error()
            os.ftruncate(self.fd, size)  # drop the last block's padding
            os.fsync(self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            raise
        os.close(self.fd)
        if hashed is None:
            return None
        hashed.result()
        assert self.digest is not None
        return self.digest.hexdigest()

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                if e.errno != errno.EINVAL or not flags & getattr(os, "O_DIRECT", 0):
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)  # the device wants another alignment
                continue
            view, offset = view[n:], offset + n

    def _raise_error(self) -> None:
        if self.error is not None:
            raise OSError(f"{self.path}: {self.error}") from self.error
