"""Measurement helpers shared by the benchmarks: process-tree RSS sampling and the raw I/O floor."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (queue shared memory, page cache) split between the
    processes that map them, so a sum over processes counts physical memory once."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, largest single-process RSS) over the process tree."""
    rss = pss = largest = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            r = p.memory_info().rss
            rss, largest = rss + r, max(largest, r)
            pss += _pss(p.pid)
        except (psutil.Error, OSError):
            pass
    return rss, pss, largest


def run_measured(cmd: list[str]) -> tuple[float, dict[str, int], str]:
    """Run a command, sampling the memory of its whole process tree every 20 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"rss_sum": 0, "pss_sum": 0, "rss_max_process": 0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout))
    reader.start()
    while proc.poll() is None:
        try:
            for key, value in zip(peak, tree_memory(ps)):
                peak[key] = max(peak[key], value)
        except psutil.Error:
            pass
        time.sleep(0.02)
    reader.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit("conversion failed:\n" + "".join(output[-20:]))
    return wall, peak, "".join(output)


def print_memory(peak: dict[str, int], stage_bytes: int, allowance: float) -> None:
    budget = stage_bytes + allowance
    print(f"peak PSS (tree)  {peak['pss_sum'] / 1e9:8.3f} GB   (physical memory of loader + saver, shared pages once)")
    print(f"peak RSS (tree)  {peak['rss_sum'] / 1e9:8.3f} GB   (sum of RSS: counts queue shared memory and page cache twice)")
    print(f"peak RSS (1 proc){peak['rss_max_process'] / 1e9:8.3f} GB")
    print(f"largest stage    {stage_bytes / 1e9:8.3f} GB   (budget: stage + {allowance / 1e9:.1f} GB = {budget / 1e9:.3f} GB)")
    print(f"within budget    PSS {peak['pss_sum'] <= budget}, largest process RSS {peak['rss_max_process'] <= budget}")


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
