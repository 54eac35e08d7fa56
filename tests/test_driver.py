"""Our convert.py driver with the toy plugins in tests/fixtures_plugins: exit status, one error line, no hang."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from util import ROOT

TOYS = ROOT / "tests" / "fixtures_plugins"


def drive(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TOYS)}
    env.pop("CKPT_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", "--load-dir", str(tmp_path),
                           "--save-dir", str(tmp_path / "out"), *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_success_writes_every_message(tmp_path):
    result = drive(tmp_path, "--loader", "toy", "--saver", "toy", "--toy-messages", "3", "--toy-note", "hi")
    assert result.returncode == 0, result.stderr
    out = torch.load(tmp_path / "out" / "toy.pt", weights_only=False)
    assert sorted(out["tensors"]) == ["layer 0", "layer 1", "layer 2"] and out["note"] == "hi"


@pytest.mark.parametrize("loader, saver", [("mcore", "toybare"), ("toy", "toybare")])
def test_aliases_and_bare_names(tmp_path, loader, saver):
    result = drive(tmp_path, "--loader", loader, "--saver", saver)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "toy.pt").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--loader", "toyfail", "--saver", "toy"], "error: loader: RuntimeError: toy loader broke at message 1"),
    (["--loader", "toy", "--saver", "toy", "--toy-skip-done"], 'error: loader: returned without sending "done"'),
    (["--loader", "toy", "--saver", "toyfail", "--toyfail-mode", "raise", "--toy-messages", "200"],
     "error: saver: ValueError: toy saver cannot write here"),
    (["--loader", "toy", "--saver", "toyfail", "--toyfail-mode", "kill", "--toy-messages", "200"],
     "error: saver: killed by SIGKILL"),
    (["--loader", "toydep", "--saver", "toy"], "toy_dependency_that_is_not_installed"),
    (["--loader", "nosuchthing", "--saver", "toy"], "error: unable to load loader plugin nosuchthing"),
    (["--loader", "toy", "--saver", "notaplugin"], "error: notaplugin module is not a plugin"),
])
def test_failures_are_one_line_and_non_zero(tmp_path, argv, expected):
    result = drive(tmp_path, *argv)
    assert result.returncode != 0
    assert len(errors(result)) == 1 and expected in errors(result)[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "toy.pt").exists()


def test_upstream_style_loader_exit(tmp_path):
    """A loader that reports, puts "exit" and exits 1: status 1, its own message, the saver stops."""
    result = drive(tmp_path, "--loader", "toyexit", "--saver", "toy")
    assert result.returncode == 1 and "toyexit: cannot read the checkpoint" in result.stderr


def test_silent_saver_failure_is_non_zero(tmp_path):
    result = drive(tmp_path, "--loader", "toy", "--saver", "toyfail", "--toyfail-mode", "exit", "--toy-messages", "200")
    assert result.returncode == 1


def test_help_lists_plugin_options(tmp_path):
    result = drive(tmp_path, "--loader", "toy", "--saver", "toy", "--help")
    assert result.returncode == 0 and "--toy-messages" in result.stdout and "--toy-note" in result.stdout


def test_unread_queue_is_drained_after_the_saver_ends():
    """After the saver has gone, messages it never read are drained so that the queue's feeder thread
    ends (one left blocked on a full pipe aborted the interpreter at exit); the closed queue is read
    directly (its get() refuses once closed, which failed conversions at random)."""
    import multiprocessing

    from ckpt_lib.engine import driver

    queue = multiprocessing.get_context("fork").Queue()
    for _ in range(8):
        queue.put(b"x" * (1 << 20))  # far more than a pipe holds: the feeder blocks
    driver.drain(queue)
    assert not queue._thread.is_alive()
