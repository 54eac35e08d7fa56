"""Measurement helpers shared by the benchmarks: process-tree RSS sampling and the raw I/O floor."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run a command, sampling the RSS of its whole process tree every 20 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout))
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.Error:
            pass
        time.sleep(0.02)
    reader.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit("conversion failed:\n" + "".join(output[-20:]))
    return wall, peak, "".join(output)


def dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def raw_floor(src: Path, out_bytes: int, scratch: Path) -> float:
    """Read every input file and write `out_bytes` with plain buffered I/O + fsync."""
    start = time.perf_counter()
    buf = bytearray(64 << 20)
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(memoryview(buf)[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    scratch.unlink()
    return time.perf_counter() - start
