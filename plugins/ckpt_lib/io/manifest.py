"""The manifest written with every output: what each file holds, its checksum, how it was made.

`conversion_manifest.json` lists every file (bytes, sha256 unless --no-checksums), every tensor (name, shape, dtype) per
file and chunk, the command line and the library versions. `verify.py` re-checks it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ConversionError

NAME = "conversion_manifest.json"
PART = ".manifest-part-{index}.json"


def sha256(path: Path) -> str:
    """Hash a file through a moving memory map of its cached pages: no read buffers to fill
    (a new 16 MiB buffer per read doubled the cost on a VM) and at most one window resident."""
    digest = hashlib.sha256()
    window = 64 << 20
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, window):
            with mmap.mmap(f.fileno(), min(window, size - offset), access=mmap.ACCESS_READ, offset=offset) as view:
                digest.update(view)
    return digest.hexdigest()


def describe(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Shape and dtype of every tensor (or tensor already written to a file) in a dict."""
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in tensors.items() if isinstance(getattr(t, "dtype", None), torch.dtype)}


class Manifest:
    def __init__(self, checksums: bool = True) -> None:
        self.checksums = checksums
        self.tensors: dict[str, dict[str, dict[str, Any]]] = {}
        self._hashing: dict[Path, Future[str | None]] = {}
        self._known: dict[str, dict[str, Any]] = {}  # files described by workers' parts
        self.target: dict[str, str] | None = None  # what the output is written for, e.g. the megatron-core release

    def record(self, relpath: str, tensors: dict[str, Any]) -> None:
        self.tensors[relpath] = describe(tensors)

    def checksum_from(self, path: Path, finished: Future[str | None]) -> None:
        """A file written in the background (`block_file`), hashed as it was written: done when
        `finished` is, its result the sha256 (None without checksums)."""
        self._hashing[path.resolve()] = finished

    def wait_for_files(self) -> None:
        """Every file given to `checksum_from` complete on disk, or its write error raised here."""
        for future in self._hashing.values():
            future.result()

    def forget_checksums(self) -> None:
        """Files were rewritten after they were hashed: hash them again when the manifest is written."""
        self.wait_for_files()
        self._hashing.clear()

    def _sha256(self, path: Path) -> str | None:
        if not self.checksums:
            return None
        future = self._hashing.get(path.resolve())
        return future.result() if future is not None else sha256(path)

    def _describe_file(self, root: Path, rel: str) -> dict[str, Any]:
        if rel in self._known:
            return self._known[rel]
        return {"bytes": (root / rel).stat().st_size, "sha256": self._sha256(root / rel)}

    def write_part(self, root: Path, index: int) -> None:
        """One worker's files and tensors, for `merge_parts` once every worker is done."""
        part = {"files": {rel: self._describe_file(root, rel) for rel in self.tensors}, "tensors": self.tensors,
                "target": self.target}
        (root / PART.format(index=index)).write_text(json.dumps(part))

    @classmethod
    def merge_parts(cls, root: Path, count: int) -> Manifest:
        """The manifest of a conversion shared by `count` workers, from their parts (then removed)."""
        merged = cls()
        for index in range(count):
            path = root / PART.format(index=index)
            part = json.loads(path.read_text())
            path.unlink()
            merged.tensors.update(part["tensors"])
            merged._known.update(part["files"])
            merged.target = part["target"]
        merged.checksums = all(f["sha256"] is not None for f in merged._known.values())
        return merged

    def write(self, root: Path) -> None:
        """Checksum every file under `root` (the staged output) and write the manifest beside them."""
        files = {rel: self._describe_file(root, rel) for rel in
                 (str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and p.name != NAME)}
        try:
            import safetensors

            st_version = safetensors.__version__
        except ImportError:  # safetensors is optional for the torch-format savers
            st_version = None
        doc = {
            "format": "ckpt-manifest/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": sys.argv,
            "versions": {"ckpt_lib": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "safetensors": st_version},
            "files": files,
            "tensors": dict(sorted(self.tensors.items())),
        }
        if self.target is not None:
            doc["target"] = self.target
        (root / NAME).write_text(json.dumps(doc, indent=1) + "\n")


def check(root: Path) -> list[str]:
    """Problems found re-checking a directory against its manifest (empty when it agrees)."""
    path = root / NAME
    if not path.exists():
        return [f"{root}: no {NAME}"]
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid manifest ({e})") from None
    problems = []
    for rel, info in doc["files"].items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
        elif f.stat().st_size != info["bytes"] or (info["sha256"] is not None and sha256(f) != info["sha256"]):
            problems.append(f"{rel}: checksum differs from the manifest")
    extra = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != NAME} - set(doc["files"])
    problems += [f"{rel}: not listed in the manifest" for rel in sorted(extra)]
    return problems
