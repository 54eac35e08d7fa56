"""install.py on a temporary tree laid out like Megatron-LM, then conversions run from that tree."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from util import ROOT, make_hf_model


def run(*argv, cwd=None):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture
def megatron(tmp_path):
    """A fake checkout: our convert.py stands in for upstream's (same command line and behaviour)."""
    root = tmp_path / "Megatron-LM"
    (root / "megatron").mkdir(parents=True)
    (root / "megatron" / "__init__.py").write_text("")
    tools = root / "tools" / "checkpoint"
    tools.mkdir(parents=True)
    shutil.copy(ROOT / "convert.py", tools / "convert.py")  # no plugins/ there: it finds what install.py copied
    (tools / "saver_core.py").write_text("# upstream file\n")
    return root


def test_install_convert_uninstall(tmp_path, megatron):
    tools = megatron / "tools" / "checkpoint"
    result = run(ROOT / "install.py", "--megatron-path", megatron)
    assert result.returncode == 0, result.stderr
    assert (tools / "loader_hf.py").exists() and (tools / "ckpt_lib" / "transport" / "protocol.py").exists()
    # run-time modules only: the test trainer stays in tests/, the verification runner in ckpt_verify
    shipped = {p.name for p in (tools / "ckpt_lib").rglob("*.py")}
    assert not shipped & {"mcore_trainer.py", "mcore_runner.py", "mcore_harness.py"} and not (tools / "ckpt_verify").exists()
    assert "installed" in result.stdout
    make_hf_model("llama", tmp_path / "hf")
    conv = run(tools / "convert.py", "--model-type", "GPT", "--loader", "hf", "--saver", "core_ext", "--load-dir", tmp_path / "hf",
               "--save-dir", tmp_path / "mc", "--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local", cwd=megatron)
    assert conv.returncode == 0, conv.stderr
    back = run(tools / "convert.py", "--model-type", "GPT", "--loader", "core_ext", "--saver", "hf", "--load-dir", tmp_path / "mc",
               "--save-dir", tmp_path / "back", cwd=megatron)
    assert back.returncode == 0, back.stderr
    again = run(ROOT / "install.py", "--megatron-path", megatron)  # re-install updates our own files
    assert again.returncode == 0, again.stderr
    removed = run(ROOT / "install.py", "--megatron-path", megatron, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert sorted(p.name for p in tools.iterdir()) == ["convert.py", "saver_core.py"]
    assert (tools / "saver_core.py").read_text() == "# upstream file\n"


def test_refuses_to_overwrite_upstream_files(megatron):
    tools = megatron / "tools" / "checkpoint"
    (tools / "loader_hf.py").write_text("# someone else's\n")
    result = run(ROOT / "install.py", "--megatron-path", megatron)
    assert result.returncode != 0 and "loader_hf.py exists" in result.stderr
    assert (tools / "loader_hf.py").read_text() == "# someone else's\n" and not (tools / "ckpt_lib").exists()
    forced = run(ROOT / "install.py", "--megatron-path", megatron, "--force")
    assert forced.returncode == 0 and (tools / "ckpt_lib").exists()


def test_refuses_a_non_megatron_path(tmp_path):
    result = run(ROOT / "install.py", "--megatron-path", tmp_path)
    assert result.returncode == 2 and "is not a Megatron-LM checkout" in result.stderr


def test_driver_reports_unknown_plugin_and_mcore_alias(tmp_path):
    unknown = run(ROOT / "convert.py", "--model-type", "GPT", "--loader", "nope", "--saver", "hf", "--load-dir", tmp_path,
                  "--save-dir", tmp_path / "x")
    assert unknown.returncode != 0 and "unable to load loader plugin nope" in unknown.stderr
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
