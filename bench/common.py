"""Measurement helpers shared by the benchmarks: process-tree RSS sampling and the raw I/O floor."""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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


def run_measured(cmd: list[str], before_timed: Callable[[], object] | None = None) -> tuple[float, dict[str, int], str]:
    """Run a conversion twice: once sampling the memory of its whole process tree every 20 ms, then, with its
    `--save-dir` emptied (and `before_timed` run, e.g. dropping caches), once timed without sampling (reading a
    process's PSS walks its page tables: 27 ms a sample for a loader mapping 16 GB of rank files, which slowed
    the run it measured by 20-50% on two cores)."""
    _, peak, _ = _run(cmd, sample=True)
    if "--save-dir" in cmd:
        shutil.rmtree(cmd[cmd.index("--save-dir") + 1], ignore_errors=True)
    if before_timed is not None:
        before_timed()
    wall, _, output = _run(cmd, sample=False)
    return wall, peak, output


def _run(cmd: list[str], sample: bool) -> tuple[float, dict[str, int], str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"rss_sum": 0, "pss_sum": 0, "rss_max_process": 0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout))
    reader.start()
    while sample and proc.poll() is None:
        try:
            for key, value in zip(peak, tree_memory(ps)):
                peak[key] = max(peak[key], value)
        except psutil.Error:
            pass
        time.sleep(0.02)
    proc.wait()
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


def raw_floor(src: Path, out_bytes: int, scratch: Path, direct: bool = False, pattern: str = "*.safetensors") -> float:
    """Read every input file (`pattern` under `src`) and write `out_bytes` with plain buffered I/O + fsync
    (the issue's floor), or with `direct`, through O_DIRECT from one reused aligned buffer (the device's
    own pace, which is how the converter writes where the file system allows it)."""
    start = time.perf_counter()
    buf = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT needs
    for f in sorted(src.rglob(pattern)):  # rank_N/ directories too
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0))
    except OSError:  # no O_DIRECT on this file system (tmpfs)
        return float("nan")
    try:
        left = -(-out_bytes // 4096) * 4096 if direct else out_bytes
        while left > 0:
            left -= os.write(fd, memoryview(buf)[:min(left, len(buf))])
        os.fsync(fd)
    finally:
        os.close(fd)
    scratch.unlink()
    return time.perf_counter() - start


ROOT = Path(__file__).resolve().parents[1]


def bench_args(doc: str, size_gb: float, workdir: str, fp8: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=size_gb, help="Size of the generated input")
    if fp8:
        parser.add_argument("--fp8", action="store_true", help="Generate DeepSeek's FP8 release layout (block 128) instead of bf16")
    parser.add_argument("--workdir", type=Path, default=Path(workdir))
    parser.add_argument("--keep", action="store_true", help="Keep the generated model and output")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    return args


def largest_stage(out: Path) -> int:
    """Bytes of the largest pipeline stage: rank dirs mp_rank_TT_PPP[_EEE] grouped by PPP."""
    stages: dict[str, int] = {}
    for f in out.rglob("mp_rank_*/*.pt"):
        parts = f.parent.name.split("_")
        stages[parts[3] if len(parts) > 3 else "0"] = stages.get(parts[3] if len(parts) > 3 else "0", 0) + f.stat().st_size
    return max(stages.values())


def measure_conversion(args: argparse.Namespace, src: Path, convert_flags: list[str], title: str, allowance: float) -> None:
    """Convert `src` with convert.py into workdir/mcore and print the figures."""
    out = args.workdir / "mcore"
    in_bytes = dir_bytes(src)
    cmd = [sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", "--load-dir", str(src), "--save-dir", str(out),
           *convert_flags]
    wall, peak, _ = run_measured(cmd)
    out_bytes = dir_bytes(out)
    floor = raw_floor(src, out_bytes, args.workdir / "floor.bin")
    print(title)
    print(f"input bytes      {in_bytes / 1e9:8.3f} GB")
    print(f"output bytes     {out_bytes / 1e9:8.3f} GB")
    print(f"wall time        {wall:8.2f} s   ({in_bytes / wall / 1e9:.2f} GB/s of input)")
    print(f"raw I/O floor    {floor:8.2f} s   (read input + write output, same run, warm cache)")
    print_memory(peak, largest_stage(out), allowance)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
