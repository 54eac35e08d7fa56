"""Other megatron-core releases for the tests: `make env` installs 0.12.1 and 0.19.2 (and the triton that
0.19.2 imports) side by side under .venv/side/, outside the venv's site-packages, which keeps 0.16.1.
`outputs_under` runs the CPU runner (ckpt_verify.mcore_runner) in a child of the venv's python whose
PYTHONPATH puts that release's `megatron` first; the runner's rank processes inherit it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIDE = ROOT / ".venv" / "side"
TRITON = SIDE / "triton"  # triton==3.7.1 (torch 2.13.0's pin), for anything that imports triton (0.17+, Megatron-LM main)
INSTALLED = "0.16.1"  # requirements-dev.txt's megatron-core, in the venv itself
# sys.path entries per release (directories under SIDE), as the Makefile installs them.
SIDE_DIRS: dict[str, tuple[str, ...]] = {
    "0.12.1": ("mcore-0.12.1",),
    "0.19.2": ("mcore-0.19.2", "triton"),  # 0.17+ imports triton unconditionally (MoE ops)
}

_CHILD = """
import sys, torch
import megatron.core, megatron.core.package_info as info
from ckpt_verify.mcore_runner import mcore_outputs
version, where, ckpt, tokens_file, layout, out_file = sys.argv[1:]
found = info.__version__.split("+")[0]
assert found == version and megatron.core.__file__.startswith(where), (found, megatron.core.__file__, version, where)
print(f"megatron-core {info.__version__} from {megatron.core.__file__}", flush=True)
layout = tuple(int(x) for x in layout.split(",")) if layout else None
torch.save(mcore_outputs(ckpt, torch.load(tokens_file), layout), out_file)
"""


def mcore_path(version: str) -> list[Path]:
    """The sys.path entries that make `import megatron` give `version` ([] for the installed one)."""
    if version == INSTALLED:
        return []
    if version not in SIDE_DIRS:
        raise ValueError(f"megatron-core {version} is not provided (have {INSTALLED}, {', '.join(SIDE_DIRS)})")
    return [SIDE / d for d in SIDE_DIRS[version]]


def missing(version: str) -> list[Path]:
    """The side directories of `version` that are not installed (run `make env`)."""
    return [p for p in mcore_path(version) if not any(p.glob("*.dist-info"))]


def outputs_under(version: str, ckpt_dir: str | Path, tokens: torch.Tensor,
                  layout: tuple[int, int, int] | None = None, timeout: int = 600) -> dict[str, torch.Tensor]:
    """`mcore_outputs` (logits, and mtp_logits with MTP) of the checkpoint run by megatron-core `version`."""
    path = mcore_path(version)
    if not path:
        import megatron.core.package_info as info

        from ckpt_verify.mcore_runner import mcore_outputs

        assert info.__version__.split("+")[0] == version, info.__version__
        return mcore_outputs(ckpt_dir, tokens, layout)
    if missing(version):
        raise FileNotFoundError(f"megatron-core {version} is not installed under {SIDE} (run `make env`)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*path, ROOT / "plugins"]))}
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, out_file = os.path.join(tmp, "tokens.pt"), os.path.join(tmp, "out.pt")
        torch.save(tokens, tokens_file)
        argv = [version, str(path[0] / "megatron"), str(Path(ckpt_dir).resolve()), tokens_file, ",".join(map(str, layout or ())), out_file]
        run = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, cwd=tmp,
                             capture_output=True, text=True, timeout=timeout)
        if run.returncode:
            raise RuntimeError(f"megatron-core {version} run failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}")
        print(run.stdout.strip())
        return torch.load(out_file)
