"""Parallel conversion: `--workers N` and torchrun ranks write exactly the bytes one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from util import ROOT, convert_cli, make_deepseek_model, make_hf_model

MANIFEST = "conversion_manifest.json"


def snapshot(directory: Path) -> tuple[dict[str, bytes], dict]:
    """Every file's bytes, and the manifest's files and tensors (its time stamp and command line differ)."""
    files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop(MANIFEST))
    return files, {k: manifest[k] for k in ("files", "tensors")}


def convert(out: Path, *argv: str) -> None:
    result = convert_cli(*argv, "--save-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("workers", [2, 3])
def test_dense_workers_write_identical_files(tmp_path, workers):
    """TP2 x PP2: two workers own whole stages; three split a stage by TP rank."""
    make_hf_model("llama", tmp_path / "hf")
    argv = ("--loader", "hf", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"),
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    convert(tmp_path / "one", *argv)
    convert(tmp_path / "many", *argv, "--workers", str(workers))
    one, many = snapshot(tmp_path / "one"), snapshot(tmp_path / "many")
    assert len(one[0]) == 5  # 4 rank files and the tracker
    assert one == many
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_deepseek_workers_write_identical_files(tmp_path):
    """MLA + MoE + MTP at PP2 x EP2 with VPP: the MTP layer and the embedding copy sit on the last stage."""
    make_deepseek_model(tmp_path / "hf")
    argv = ("--loader", "hf_deepseek3", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"),
            "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2",
            "--num-layers-per-virtual-pipeline-stage", "1", "--mtp-num-layers", "1")
    convert(tmp_path / "one", *argv)
    convert(tmp_path / "two", *argv, "--workers", "2")
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_core_ext_reshard_with_workers(tmp_path):
    """mcore -> mcore: the legacy loader also sends each worker only the layers it writes."""
    make_hf_model("qwen3", tmp_path / "hf")
    convert(tmp_path / "src", "--loader", "hf", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"),
            "--target-tensor-parallel-size", "2")
    argv = ("--loader", "core_ext", "--saver", "core_ext", "--load-dir", str(tmp_path / "src"),
            "--target-pipeline-parallel-size", "2", "--num-layer-list", "3,1")
    convert(tmp_path / "one", *argv)
    convert(tmp_path / "two", *argv, "--workers", "2")
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_torchrun_ranks_write_identical_files(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    argv = ["--model-type", "GPT", "--loader", "hf", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"),
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]
    convert(tmp_path / "one", *argv[2:])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, str(ROOT / "convert.py"), *argv, "--save-dir", str(tmp_path / "ranks")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "ranks")


def test_a_failing_worker_leaves_nothing(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes()[:5000])
    result = convert_cli("--loader", "hf", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"),
                         "--save-dir", str(tmp_path / "out"), "--target-pipeline-parallel-size", "2", "--workers", "2")
    assert result.returncode != 0
    assert "error:" in result.stderr and "nothing was written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize(("argv", "message"), [
    (("--saver", "hf", "--workers", "2"), "need a saver that writes shares"),
    (("--saver", "core_ext", "--workers", "2", "--ckpt-format", "torch_dist"), "torch_dist is written by one process"),
    (("--saver", "core_ext", "--workers", "0"), "--workers must be >= 1"),
])
def test_worker_option_errors(tmp_path, argv, message):
    make_hf_model("llama", tmp_path / "hf")
    result = convert_cli("--loader", "hf", "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "out"), *argv)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_workers_auto_counts_cores_and_stages():
    """A worker (loader + saver) per two cores, at most one per target stage, 1 where shares cannot be written."""
    import argparse
    from types import SimpleNamespace

    from ckpt_lib.engine.driver import auto_workers

    shared, whole = SimpleNamespace(SHARED_OUTPUT=True), SimpleNamespace()

    def options(**kw):
        return argparse.Namespace(**{"ckpt_format": "torch", "target_pipeline_parallel_size": 4, **kw})

    assert [auto_workers(shared, options(), 1, cores=c) for c in (1, 2, 3, 6, 16)] == [1, 1, 1, 3, 4]
    assert auto_workers(shared, options(target_pipeline_parallel_size=None), 1, cores=16) == 1
    assert auto_workers(shared, options(ckpt_format="torch_dist"), 1, cores=16) == 1
    assert auto_workers(whole, options(), 1, cores=16) == 1
    assert auto_workers(shared, options(), 4, cores=16) == 1  # torchrun: every rank is one worker


def test_workers_auto_keeps_optimizer_state_in_one_process(tmp_path):
    """A core_ext source with distributed-optimizer state: carried by one process, so auto is 1 unless --no-load-optim."""
    import argparse
    from types import SimpleNamespace

    from ckpt_lib.engine.driver import auto_workers

    (tmp_path / "iter_0000010" / "mp_rank_00_000").mkdir(parents=True)
    (tmp_path / "iter_0000010" / "mp_rank_00_000" / "distrib_optim.pt").write_bytes(b"")
    shared = SimpleNamespace(SHARED_OUTPUT=True)

    def options(**kw):
        return argparse.Namespace(**{"ckpt_format": "torch", "target_pipeline_parallel_size": 4, "load_dir": str(tmp_path),
                                     "no_load_optim": False, **kw})

    assert auto_workers(shared, options(), 1, cores=16) == 1
    assert auto_workers(shared, options(no_load_optim=True), 1, cores=16) == 4
    (tmp_path / "iter_0000010" / "mp_rank_00_000" / "distrib_optim.pt").unlink()
    assert auto_workers(shared, options(), 1, cores=16) == 4


def test_workers_auto_on_the_command_line_writes_the_same_files(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    argv = ("--loader", "hf", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"), "--target-pipeline-parallel-size", "2")
    convert(tmp_path / "auto", *argv, "--workers", "auto")
    convert(tmp_path / "one", *argv, "--workers", "1")
    assert snapshot(tmp_path / "auto") == snapshot(tmp_path / "one")
    result = convert_cli(*argv, "--save-dir", str(tmp_path / "bad"), "--workers", "many")
    assert result.returncode != 0 and "expected a number or auto, got 'many'" in result.stderr
