"""What every plugin needs around its work: one-line errors, "exit" on loader failure, progress
and the closing summary. Works under our convert.py and under upstream's unchanged."""

from __future__ import annotations

import ctypes
import gc
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from ..errors import ConversionError, debug
from ..io import safetensors_io
from .protocol import EXIT, LoaderExited

T = TypeVar("T")


def _fail(role: str, error: BaseException) -> None:
    if debug():
        traceback.print_exception(error)
    print(f"error: {role}: {error}", file=sys.stderr, flush=True)


INFLIGHT_BYTES = 256 << 20  # tensor bytes sent but not yet taken by the saver


def _tensor_bytes(message: Any) -> int:
    if not isinstance(message, dict):
        return 0
    return sum(v.nbytes for v in message.values() if isinstance(v, torch.Tensor))


class PacedQueue:
    """The loader's end of the queue, holding back while the saver has more than INFLIGHT_BYTES
    of tensors still to take. Messages carry tensors in shared memory, so a queue of 50 layers
    (upstream's default size) would keep 50 layers in memory when the loader is faster than
    the saver; pacing keeps memory at about that budget plus the layers being read and written."""

    def __init__(self, queue: Any, budget: int = INFLIGHT_BYTES) -> None:
        self.queue, self.budget = queue, budget
        self.sent: deque[int] = deque()
        self.puts = 0

    def _waiting(self) -> int:
        try:
            return self.queue.qsize()
        except (NotImplementedError, AttributeError):  # macOS, or a queue without qsize: its own bound applies
            return 0

    def put(self, message: Any, *args: Any, **kwargs: Any) -> None:
        size = _tensor_bytes(message)
        while True:
            waiting = min(self._waiting(), len(self.sent))
            if waiting == 0 or sum(list(self.sent)[-waiting:]) + size <= self.budget:
                break
            time.sleep(0.002)
        self.sent.append(size)
        if len(self.sent) > 1024:
            self.sent.popleft()
        self.queue.put(message, *args, **kwargs)
        self.puts += 1

    def messages(self) -> tuple[int, int]:
        """Messages put so far, and how many of them the saver has received."""
        return self.puts, self.puts - self._waiting()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


def return_freed_memory() -> None:
    """Serve allocations of 4 MiB and more from mmap so that freeing a layer gives its memory back.

    glibc raises its mmap threshold after the first large free, and from then on layer-sized
    buffers (TP-split copies, read buffers) come from the heap, where fragmentation keeps them
    resident: memory then grows with the number of layers converted. Setting the threshold
    explicitly turns that adjustment off. Smaller buffers (single experts) stay on the heap, where
    reuse is fast: at 1 MiB, page faults on fresh mappings made expert copies three times slower."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def settle_process() -> None:
    """Tune a converter process: one compute thread (conversion is memory-bound; OpenMP's idle
    threads spun on 15% of the CPU the other process needed), the import-time objects frozen out of
    the garbage collector (torch's thousands were rescanned on every collection), freed layers
    returned to the system."""
    torch.set_num_threads(1)
    gc.freeze()
    return_freed_memory()


def run_loader(body: Callable[[Any, Any], None], queue: Any, args: Any) -> None:
    """Run a loader; on failure tell the saver ("exit") and exit non-zero with one clear line."""
    settle_process()
    paced = PacedQueue(queue)
    pool = _shared_pool(paced)
    try:
        with safetensors_io.pooled(pool):
            body(paced, args)
    except (ConversionError, OSError) as e:
        _fail("loader", e)
        queue.put(EXIT)
        sys.exit(1)
    except BaseException:
        queue.put(EXIT)
        raise
    finally:
        if pool is not None:
            if debug():
                print(f"loader: {pool.reused} reads into reused shared memory, {pool.fresh} fresh ({pool.fresh_bytes / 1e9:.2f} GB)", file=sys.stderr, flush=True)
            pool.close()  # the saver's mappings stay valid; idle buffers are freed


def _shared_pool(paced: PacedQueue) -> safetensors_io.SharedPool | None:
    """Shared-memory buffers used again, when the driver names the saver's process and the queue can
    tell how many messages it has received (not under upstream's convert.py: fresh buffers there)."""
    pid = getattr(paced.queue, "saver_pid", None)
    try:
        paced.queue.qsize()
    except (NotImplementedError, AttributeError):
        return None
    return safetensors_io.SharedPool(pid, paced.messages) if isinstance(pid, int) and sys.platform == "linux" else None


def run_saver(body: Callable[[Any, Any], None], queue: Any, args: Any) -> None:
    """Run a saver in its child process; every failure is one line and exit status 1."""
    settle_process()
    try:
        body(queue, args)
    except LoaderExited:
        sys.exit(1)  # the loader has reported its own error
    except (ConversionError, OSError) as e:
        _fail("saver", e)
        sys.exit(1)


def progress(items: Iterable[T], total: int, desc: str) -> Iterable[T]:
    """tqdm when available and attached to a terminal; a plain iterator otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional under an upstream Megatron-LM environment
        return items
    return tqdm(items, total=total, desc=desc, unit="layer", file=sys.stderr, disable=None, mininterval=1.0)


class Summary:
    """Collects what was written and prints one short block at the end."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.start = time.perf_counter()
        self.files = 0
        self.bytes = 0
        self.notes: list[str] = []

    def add_file(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes

    def print(self, target: Any) -> None:
        seconds = time.perf_counter() - self.start
        rate = self.bytes / seconds / 1e9 if seconds > 0 else 0.0
        print(
            f"{self.what}: wrote {self.files} files, {self.bytes / 1e9:.3f} GB to {target} "
            f"in {seconds:.1f} s ({rate:.2f} GB/s)",
            flush=True,
        )
        for note in self.notes:
            print(f"  {note}", flush=True)
