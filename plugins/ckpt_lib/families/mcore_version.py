"""Which megatron-core release a legacy `torch` checkpoint is written for, and the names that differ.

Legacy rank files are loaded `strict` by name, so they must carry the names of the megatron-core that
will load them. One difference so far: from 0.17 on (Megatron-LM commit 9d71cb1cd2) an MTP layer's
submodule is `mtp.layers.<i>.mtp_model_layer.*` in `state_dict()`, in 0.12-0.16 `transformer_layer.*`
(torch_dist keys are the same in both: 0.17+ maps the new name back in `sharded_state_dict`).

The release is `--target-mcore-version X.Y`, by default the one the user runs: the Megatron-LM checkout
the plugins are installed in (or `--megatron-path`), else the installed megatron-core, else the newest
tested. Reading detects either naming from the files.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from ..transport.spec import ModelSpec

Version = tuple[int, int]

NEWEST: Version = (0, 19)  # the newest release tested; the default when nothing says which one runs
MTP_RENAMED: Version = (0, 17)
MTP_SUBMODULES = ("transformer_layer", "mtp_model_layer")  # before / from MTP_RENAMED
# MLA without q_lora_rank: 0.16.1 builds a plain linear_q_proj; 0.19.2 (mla_qk_norm_config) fuses a norm of its own
# into it whenever qk_layernorm is on, which the kv latent norm needs. 0.17 and 0.18 are not checked: refused too.
Q_NORM_FUSED: Version = (0, 17)


@dataclass(frozen=True)
class Target:
    """The release written for and where that choice came from (printed and recorded)."""

    version: Version
    source: str

    @property
    def text(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def mtp_submodule(self) -> str:
        return MTP_SUBMODULES[self.version >= MTP_RENAMED]


def parse(text: str, what: str = "--target-mcore-version") -> Version:
    """'0.19', '0.19.2' or '0.20.0rc1' -> (0, 19)."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.\d+)?\S*\s*$", str(text))
    if not match:
        raise ConversionError(f"{what}: {text!r} is not a megatron-core version (X.Y or X.Y.Z)")
    return int(match[1]), int(match[2])


def from_package_info(path: Path) -> Version | None:
    """MAJOR and MINOR of a checkout's megatron/core/package_info.py, read without importing it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    major, minor = (re.search(rf"^{name}\s*=\s*(\d+)", text, re.M) for name in ("MAJOR", "MINOR"))
    return (int(major[1]), int(minor[1])) if major and minor else None


def _plugins_checkout() -> Path | None:
    """The Megatron-LM checkout these plugins were installed into (tools/checkpoint/ckpt_lib/)."""
    tools = Path(__file__).resolve().parents[1]
    root = tools.parents[1]
    if tools.name == "checkpoint" and tools.parent.name == "tools" and (root / "megatron" / "core").is_dir():
        return root
    return None


def resolve(requested: str | None, megatron_path: str | None = None) -> Target:
    """The release to write names for: the option, else the checkout's, else installed, else NEWEST."""
    if requested:
        return Target(parse(requested), "--target-mcore-version")
    for checkout in (Path(megatron_path) if megatron_path else None, _plugins_checkout()):
        if checkout is not None:
            info = checkout / "megatron" / "core" / "package_info.py"
            version = from_package_info(info)
            if version is not None:
                return Target(version, str(info))
    try:
        return Target(parse(importlib.metadata.version("megatron-core")), "installed megatron-core")
    except (importlib.metadata.PackageNotFoundError, ConversionError):
        return Target(NEWEST, "newest tested")


def detect_mtp_submodule(names: list[str], index: int = 0) -> str:
    """The MTP submodule name a checkpoint's state dict uses (either release's)."""
    for submodule in MTP_SUBMODULES:
        if any(n.startswith(f"mtp.layers.{index}.{submodule}.") for n in names):
            return submodule
    return MTP_SUBMODULES[0]


def check_target(md: ModelSpec, version: Version) -> None:
    """What the target release cannot build from these weights is refused before anything is written."""
    if md.mla and not md.mla.q_lora_rank and version >= Q_NORM_FUSED:
        raise ConversionError(f"MLA without q_lora_rank (a plain query projection: DeepSeek-V2-Lite, Moonlight): megatron-core "
                              f"{version[0]}.{version[1]} fuses a norm into linear_q_proj when qk_layernorm is on (as the MLA kv "
                              "norm needs; checked in 0.19.2), a norm the HF model does not have; use --target-mcore-version 0.16")
