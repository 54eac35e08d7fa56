"""The manifest written with every output: what each file holds, its checksum, how it was made.

`conversion_manifest.json` lists every file (bytes and its digest under the chosen `--checksum`), every tensor (name,
shape, dtype) per file and chunk, the command line and the library versions. `verify.py` re-checks it.

Digests: sha256, what hubs compare for HF shards, 1.8 GB/s per core here; blake3, 4.6 GB/s per core, the default for
Megatron rank files (so hashing keeps up with the disk); or none. The manifest names the one used
(`"checksum"`; manifests without it are sha256).
"""

from __future__ import annotations

import hashlib
import importlib.util
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


CHECKSUMS = ("sha256", "blake3", "none")


def blake3_installed() -> bool:
    return importlib.util.find_spec("blake3") is not None


def default_rank_file_checksum() -> str:
    """blake3 where the `blake3` package is installed (it is a dependency of this package; a Megatron-LM checkout
    the plugins were copied into may lack it), else sha256."""
    return "blake3" if blake3_installed() else "sha256"


def add_checksum_arguments(group: Any, default: str, why: str) -> None:
    """The saver options choosing the manifest's digest (`--no-checksums` kept for existing scripts)."""
    group.add_argument("--checksum", choices=CHECKSUMS, default=default,
                       help=f"Digest of every output file in {NAME}, hashed as written beside the conversion ({why})")
    group.add_argument("--no-checksums", action="store_true", help="Same as --checksum none")


def chosen_checksum(args: Any, default: str) -> str:
    """The digest the options choose; contradicting options are refused before anything is written."""
    checksum = getattr(args, "checksum", None) or default
    if getattr(args, "no_checksums", False):
        if checksum not in ("none", default):
            raise ConversionError(f"--no-checksums contradicts --checksum {checksum}")
        return "none"
    return checksum


def hasher(algorithm: str) -> Any:
    """A new incremental hash object (`update`, `hexdigest`) for a `CHECKSUMS` name other than "none"."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            import blake3
        except ImportError:
            raise ConversionError("--checksum blake3 needs the blake3 package (pip install blake3)") from None
        return blake3.blake3()
    raise ConversionError(f"unknown checksum '{algorithm}' (choose from {', '.join(CHECKSUMS)})")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hash a file through a moving memory map of its cached pages: no read buffers to fill
    (a new 16 MiB buffer per read doubled the cost on a VM) and at most one window resident."""
    digest = hasher(algorithm)
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
    def __init__(self, checksum: str = "sha256") -> None:
        if checksum != "none":
            hasher(checksum)  # an unknown or uninstalled digest fails before anything is written
        self.checksum = checksum
        self.tensors: dict[str, dict[str, dict[str, Any]]] = {}
        self._hashing: dict[Path, Future[str | None]] = {}
        self._known: dict[str, dict[str, Any]] = {}  # files described by workers' parts
        self.target: dict[str, str] | None = None  # what the output is written for, e.g. the megatron-core release

    def record(self, relpath: str, tensors: dict[str, Any]) -> None:
        self.tensors[relpath] = describe(tensors)

    @property
    def algorithm(self) -> str | None:
        """The digest files are hashed with as they are written (None: no checksums)."""
        return None if self.checksum == "none" else self.checksum

    def checksum_from(self, path: Path, finished: Future[str | None]) -> None:
        """A file written in the background (`block_file`), hashed as it was written: done when
        `finished` is, its result the digest (None without checksums)."""
        self._hashing[path.resolve()] = finished

    def wait_for_files(self) -> None:
        """Every file given to `checksum_from` complete on disk, or its write error raised here."""
        for future in self._hashing.values():
            future.result()

    def forget_checksums(self) -> None:
        """Files were rewritten after they were hashed: hash them again when the manifest is written."""
        self.wait_for_files()
        self._hashing.clear()

    def _describe_file(self, root: Path, rel: str) -> dict[str, Any]:
        if rel in self._known:
            return self._known[rel]
        path = root / rel
        info: dict[str, Any] = {"bytes": path.stat().st_size}
        if self.algorithm is not None:
            future = self._hashing.get(path.resolve())
            info[self.algorithm] = future.result() if future is not None else file_digest(path, self.algorithm)
        return info

    def write_part(self, root: Path, index: int) -> None:
        """One worker's files and tensors, for `merge_parts` once every worker is done."""
        part = {"files": {rel: self._describe_file(root, rel) for rel in self.tensors}, "tensors": self.tensors,
                "target": self.target, "checksum": self.checksum}
        (root / PART.format(index=index)).write_text(json.dumps(part))

    @classmethod
    def merge_parts(cls, root: Path, count: int) -> Manifest:
        """The manifest of a conversion shared by `count` workers, from their parts (then removed)."""
        merged = cls("none")
        for index in range(count):
            path = root / PART.format(index=index)
            part = json.loads(path.read_text())
            path.unlink()
            merged.tensors.update(part["tensors"])
            merged._known.update(part["files"])
            merged.target, merged.checksum = part["target"], part["checksum"]
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
            "checksum": self.checksum,
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
    algorithm = doc.get("checksum", "sha256")  # manifests before --checksum: sha256, or null per file
    problems = []
    for rel, info in doc["files"].items():
        f = root / rel
        expected = info.get(algorithm)
        if not f.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{rel}: size differs from the manifest")
        elif expected is not None and file_digest(f, algorithm) != expected:
            problems.append(f"{rel}: checksum differs from the manifest ({algorithm})")
    extra = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != NAME} - set(doc["files"])
    problems += [f"{rel}: not listed in the manifest" for rel in sorted(extra)]
    return problems
