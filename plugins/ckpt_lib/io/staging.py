"""Atomic output directories: build beside `--save-dir`, rename into place only when complete.

An interrupted conversion leaves either no output or the previous checkpoint intact; replacing
an existing non-empty directory needs `--overwrite`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConversionError


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def current_umask() -> int:
    """The process umask, read by setting it and setting it back (POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_target(save_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty target without --overwrite; done before any work starts."""
    target = Path(save_dir).absolute()
    if target.exists() and not target.is_dir():
        raise ConversionError(f"--save-dir {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"--save-dir {target} is not empty; pass --overwrite to replace it")
    return target


class StagedDir:
    """A temporary directory next to the target, committed by one rename."""

    def __init__(self, save_dir: str | Path, overwrite: bool) -> None:
        self.target = check_target(save_dir, overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        self.path.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the checkpoint from colleagues and jobs

    def commit(self) -> Path:
        """Move the staged directory into place. An existing target is swapped with it in one atomic
        `renameat2(RENAME_EXCHANGE)`, so a kill at any point leaves the old or the new checkpoint."""
        if not self.target.exists():
            os.replace(self.path, self.target)
        elif _exchange(self.path, self.target):
            shutil.rmtree(self.path, ignore_errors=True)  # now holds the old checkpoint
        else:  # no renameat2 (not Linux/glibc): two renames, the old one kept aside until the end
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:  # a failed conversion leaves nothing behind
            self.discard()
