"""Fault tolerance: a conversion killed (SIGKILL) at random points leaves no output or a complete one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from ckpt_lib.io import manifest
from util import ROOT, make_hf_model


def start(hf, out, *extra):
    cmd = [sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", "--loader", "hf", "--saver", "core_ext",
           "--load-dir", str(hf), "--save-dir", str(out), "--target-tensor-parallel-size", "2",
           "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_sigkill_leaves_nothing_or_a_complete_checkpoint(tmp_path):
    make_hf_model("llama", tmp_path / "hf", num_layers=8, hidden_size=256, intermediate_size=512)
    out = tmp_path / "out"
    rng = random.Random(0)
    outcomes = set()
    for attempt in range(8):
        previous = None
        if out.exists():
            previous = json.loads((out / manifest.NAME).read_text())["created"]
        proc = start(tmp_path / "hf", out, "--overwrite")
        time.sleep(0.5 if attempt == 0 else rng.uniform(0.3, 5.0))  # the first lands before any output
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not out.exists():
            outcomes.add("absent")
            continue
        assert manifest.check(out) == [], f"attempt {attempt}: incomplete checkpoint"
        created = json.loads((out / manifest.NAME).read_text())["created"]
        outcomes.add("old" if created == previous else "complete")
    finished = start(tmp_path / "hf", out, "--overwrite")
    assert finished.wait(timeout=120) == 0
    assert manifest.check(out) == []
    assert "absent" in outcomes and outcomes & {"old", "complete"}, outcomes


def test_output_modes_follow_the_umask(tmp_path):
    """Files 0666 & ~umask and directories 0777 & ~umask, as any tool writes them (not mkdtemp's 0700,
    not executable data files): colleagues and other jobs on a shared file system can read the checkpoint."""
    make_hf_model("llama", tmp_path / "hf")
    for umask in (0o022, 0o077):
        out = tmp_path / f"out-{umask:o}"
        cmd = [sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", "--loader", "hf", "--saver", "core_ext",
               "--load-dir", str(tmp_path / "hf"), "--save-dir", str(out), "--target-tensor-parallel-size", "2"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=lambda m=umask: os.umask(m))
        assert result.returncode == 0, result.stderr
        paths = [out, *out.rglob("*")]
        assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()} == {oct(0o777 & ~umask)}
        assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {oct(0o666 & ~umask)}
