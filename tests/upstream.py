"""Upstream Megatron-LM's own tools/checkpoint/convert.py (and its loaders and savers) next to our plugins, on CPU.

The source snapshots are ../shared/megatron-lm/Megatron-LM-<version>.tar.gz (each extracts to Megatron-LM/).
`extract` unpacks one into a directory of the caller's (a temporary one: never the repository) and runs
install.py on it; `convert` runs that checkout's tools/checkpoint/convert.py in a child process whose
PYTHONPATH is [shim, checkout, (triton)]. The upstream files are never modified: what upstream needs to run
without CUDA, Transformer Engine or Apex is done by the shim's sitecustomize.py, in those children only.
Each item below was checked to be necessary (without it the saver dies; see the notes on exit status):

- every snapshot
  * CUDA_DEVICE_MAX_CONNECTIONS=1: validate_args asserts it whenever TP > 1.
  * megatron.training.arguments.parse_args / validate_args wrapped to switch off the fusions that need TE,
    Apex or CUDA (rope, bias-swiglu, masked-softmax, bias-gelu, bias-dropout, gradient-accumulation;
    persistent layer norm): validate_args raises "apply_rope_fusion is not available" otherwise. They are
    forced off before and after validation, since saver_base copies the loader's checkpoint_args over
    Megatron's defaults first.
  * torch.cuda.get_rng_state without CUDA returns the CPU generator's state: save_checkpoint stores the
    CUDA RNG state in every rank file. Likewise get_device_capability -> (0, 0) and get_device_properties
    -> major 0: validate_args of core_r0.19.0 / main asks get_device_arch_version() under TP (and the
    capability with --moe-grouped-gemm).
  * a fake `transformer_engine-0.12.0.dist-info` on the path: saver_base asserts a Transformer Engine
    >= 0.12 distribution through importlib.metadata before anything else (the package itself is absent,
    so megatron-core's `import transformer_engine` guards still see no TE).
- core_r0.12.0: megatron.legacy.fused_kernels.load is a no-op (saver_base and loader_base compile CUDA
  kernels with it at start-up; later releases no longer call it).
- core_r0.19.0 and main (megatron-core 0.19 / 0.20)
  * triton on the path (.venv/side/triton, provisioned by `make env`): megatron.core imports it
    unconditionally (moe/ops/paged_stash.py, ssm/ops).
  * typing.override (Python 3.12, megatron/training/models/{gpt,hybrid}.py) is typing_extensions.override
    on 3.11.

The checkout comes first on PYTHONPATH. Upstream inserts --megatron-path at sys.path[0] only inside its
own loader and saver, when they start; a process of ours on the other side of the queue does not, and
unpickling the checkpoint_args that upstream loader_core sends (megatron enums) imports megatron.core in
it: without the checkout first, our saver_hf under upstream loader_core imported the venv's
megatron-core 0.16.1 while the loader ran core_r0.12.0's. `convert` asserts that every process that
imported megatron.core took it from the checkout (the shim records it in UPSTREAM_SHIM_LOG).

Upstream's convert.py does not look at the saver process's exit status: when upstream saver_core dies the
run still exits 0 (all three snapshots), so callers must check that the checkpoint was written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT.parent / "shared" / "megatron-lm"
SIDE = ROOT / ".venv" / "side"
VERSIONS = {  # short name -> tarball stem
    "core_r0.12.0": "Megatron-LM-core_r0.12.0",
    "core_r0.19.0": "Megatron-LM-core_r0.19.0",
    "main": "Megatron-LM-main-d98e8a64dd",
}
NEEDS_TRITON = {"core_r0.19.0", "main"}

SITECUSTOMIZE = r'''
"""Test-only shim for running upstream Megatron-LM's checkpoint converter on CPU (see tests/upstream.py)."""
import importlib.abc
import os
import sys

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

if sys.version_info < (3, 12):
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override

FUSIONS_OFF = {
    "apply_rope_fusion": False, "bias_swiglu_fusion": False, "masked_softmax_fusion": False,
    "bias_gelu_fusion": False, "bias_dropout_fusion": False, "gradient_accumulation_fusion": False,
    "no_persist_layer_norm": True, "persist_layer_norm": False,
}


def _fusions_off(args):
    for name, value in FUSIONS_OFF.items():
        if hasattr(args, name) or name == "no_persist_layer_norm":
            setattr(args, name, value)
    return args


def _patch_arguments(module):
    parse_args, validate_args = module.parse_args, module.validate_args

    def parse(*a, **k):
        return _fusions_off(parse_args(*a, **k))

    def validate(args, *a, **k):
        _fusions_off(args)
        out = validate_args(args, *a, **k)
        _fusions_off(args)
        return out

    module.parse_args, module.validate_args = parse, validate


def _patch_fused_kernels(module):
    module.load = lambda *a, **k: None


def _patch_torch_cuda():
    import torch

    if torch.cuda.is_available():
        return
    import types

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.get_device_capability = lambda device=None: (0, 0)
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        major=0, minor=0, name="cpu", total_memory=0, multi_processor_count=0)


def _record(module):
    log = os.environ.get("UPSTREAM_SHIM_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} megatron.core {module.__file__}\n")


PATCHES = {
    "megatron.training.arguments": _patch_arguments,
    "megatron.legacy.fused_kernels": _patch_fused_kernels,
    "megatron.training.checkpointing": lambda m: _patch_torch_cuda(),
    "megatron.core": lambda m: (_patch_torch_cuda(), _record(m)),
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of PATCHES with the other finders and patches them right after they execute."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, patch = spec.loader, PATCHES[name]
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            original(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
'''

FAKE_TE = "transformer_engine-0.12.0.dist-info"


def available(version: str) -> str | None:
    """None when `version` can run here, else why not."""
    tarball = SNAPSHOTS / f"{VERSIONS[version]}.tar.gz"
    if not tarball.exists():
        return f"{tarball} is not there"
    if version in NEEDS_TRITON and not any((SIDE / "triton").glob("triton-*.dist-info")):
        return f"{version} imports triton: run `make env` (provisions {SIDE / 'triton'})"
    return None


def write_shim(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    meta = directory / FAKE_TE
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: transformer-engine\nVersion: 0.12.0\n")
    return directory


def extract(version: str, directory: Path) -> Path:
    """Unpack the snapshot of `version` under `directory` and install our plugins into it; the checkout."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(SNAPSHOTS / f"{VERSIONS[version]}.tar.gz") as tar:
        tar.extractall(directory, filter="data")
    checkout = directory / "Megatron-LM"
    assert (checkout / "tools" / "checkpoint" / "convert.py").is_file(), f"{version}: no tools/checkpoint/convert.py"
    installed = subprocess.run([sys.executable, str(ROOT / "install.py"), "--megatron-path", str(checkout)],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    write_shim(directory / "shim")
    return checkout


def environment(checkout: Path, version: str, log: Path | None = None, debug: bool = True) -> dict[str, str]:
    """The child's environment: PYTHONPATH [shim, checkout, (triton)] and nothing else of the caller's."""
    path = [checkout.parent / "shim", checkout]
    if version in NEEDS_TRITON:
        path.append(SIDE / "triton")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "CKPT_DEBUG")}
    env.update(PYTHONPATH=os.pathsep.join(map(str, path)), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="", CUDA_DEVICE_MAX_CONNECTIONS="1")
    if debug:
        env["CKPT_DEBUG"] = "1"  # our plugins print their traceback with the error line
    if log is not None:
        env["UPSTREAM_SHIM_LOG"] = str(log)
    return env


def convert(checkout: Path, version: str, *argv: str | Path, timeout: int = 300, debug: bool = True) -> subprocess.CompletedProcess:
    """`python tools/checkpoint/convert.py --megatron-path CHECKOUT --model-type GPT ARGV`, run inside the checkout.

    Asserts that every process that imported megatron.core took it from the checkout; the CompletedProcess
    gets `megatron_core_imports` (one line per such process). subprocess.TimeoutExpired after `timeout`."""
    fd, name = tempfile.mkstemp(prefix="shim-", suffix=".log", dir=checkout.parent)
    os.close(fd)
    log = Path(name)
    cmd = [sys.executable, "tools/checkpoint/convert.py", "--megatron-path", str(checkout), "--model-type", "GPT", *map(str, argv)]
    try:
        result = subprocess.run(cmd, cwd=checkout, env=environment(checkout, version, log, debug), capture_output=True,
                                text=True, timeout=timeout)
        imported = log.read_text().splitlines()
    finally:
        log.unlink(missing_ok=True)
    wrong = [line for line in imported if not line.split(" ", 2)[2].startswith(str(checkout))]
    assert not wrong, f"megatron.core not from the checkout {checkout}: {wrong}"
    result.megatron_core_imports = imported  # type: ignore[attr-defined]
    return result


def output(result: subprocess.CompletedProcess, tail: int = 6000) -> str:
    """The end of a run's output, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-tail:]}\n--- stderr\n{result.stderr[-tail:]}"


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]
