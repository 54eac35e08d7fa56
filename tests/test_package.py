"""`pip install .`: the plugin modules, ckpt_lib and the `mcore-convert` / `mcore-verify` commands, used
from outside the repository (nothing of it on the path) for a tiny conversion and its verification."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from util import ROOT, make_hf_model, read_safetensors_dir


def _copy_sources(dest):
    """The files a source distribution holds (a build in the checkout would leave egg-info behind)."""
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "plugins", dest / "plugins", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


def test_pip_install_gives_working_commands(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    _copy_sources(src)
    # --no-deps / --no-build-isolation: this venv already has the dependencies and setuptools (CI installs
    # into a fresh venv with the index in .ci/run); --target keeps it out of the venv.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    installed = sorted(p.name for p in site.iterdir() if p.suffix == ".py" or p.name == "ckpt_lib")
    assert installed == ["ckpt_lib", "loader_core_ext.py", "loader_core_mf.py", "loader_hf.py", "loader_hf_deepseek3.py",
                         "saver_core_ext.py", "saver_hf.py"]
    env = {**os.environ, "PYTHONPATH": str(site)}
    work = tmp_path / "elsewhere"  # not the repository: only the installed copy can be found
    work.mkdir()

    def run(command, *argv):
        return subprocess.run([str(site / "bin" / command), *map(str, argv)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=work)

    helped = run("mcore-convert", "--loader", "hf", "--saver", "core_ext", "--help")
    assert helped.returncode == 0 and "--target-tensor-parallel-size" in helped.stdout, helped.stderr
    make_hf_model("qwen2", work / "hf", num_layers=2)
    conv = run("mcore-convert", "--model-type", "GPT", "--loader", "hf", "--saver", "core_ext", "--load-dir", work / "hf",
               "--save-dir", work / "mc", "--target-tensor-parallel-size", "2")
    assert conv.returncode == 0, conv.stderr
    found = subprocess.run([sys.executable, "-c", "import ckpt_lib, loader_hf; print(ckpt_lib.__file__, loader_hf.__file__)"],
                           capture_output=True, text=True, env=env, cwd=work, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in found), found
    back = run("mcore-convert", "--model-type", "GPT", "--loader", "core_ext", "--saver", "hf", "--load-dir", work / "mc",
               "--save-dir", work / "hf2", "--hf-config-dir", work / "hf")
    assert back.returncode == 0, back.stderr
    original, again = read_safetensors_dir(work / "hf"), read_safetensors_dir(work / "hf2")
    assert original.keys() == again.keys() and all(original[k].equal(again[k]) for k in original)
    checked = run("mcore-verify", "--source", work / "hf", "--converted", work / "mc")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    bad = run("mcore-verify", "--source", work / "missing", "--converted", work / "mc")
    assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr
