"""What every plugin needs around its work: one-line errors, "exit" on loader failure, progress
and the closing summary. Works under our convert.py and under upstream's unchanged."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import ConversionError
from .protocol import EXIT, LoaderExited

T = TypeVar("T")


def _fail(role: str, error: BaseException) -> None:
    if os.environ.get("CKPT_DEBUG"):
        traceback.print_exception(error)
    print(f"error: {role}: {error}", file=sys.stderr, flush=True)


def run_loader(body: Callable[[Any, Any], None], queue: Any, args: Any) -> None:
    """Run a loader; on failure tell the saver ("exit") and exit non-zero with one clear line."""
    try:
        body(queue, args)
    except (ConversionError, OSError) as e:
        _fail("loader", e)
        queue.put(EXIT)
        sys.exit(1)
    except BaseException:
        queue.put(EXIT)
        raise


def run_saver(body: Callable[[Any, Any], None], queue: Any, args: Any) -> None:
    """Run a saver in its child process; every failure is one line and exit status 1."""
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
