"""Benchmark: conversion cost against model size, for dense and DeepSeek-V3-shaped models.

Generates synthetic bf16 HF checkpoints at each size (dense Llama-shaped -> TP2xPP2, DeepSeek-V3-shaped
with MLA/MoE/MTP -> TP2xEP2xPP2), converts each with convert.py, and prints per model: input and
output bytes, wall time, throughput, peak PSS of the process tree (physical memory, shared pages
counted once), the largest layer, and the raw I/O floor of the same machine measured in the same
run (reading the input and writing as many bytes with plain file I/O, then fsync), and the same with
the writes through O_DIRECT (the device's pace, how the converter writes where it can). Warm cache: the input was
just read. Cold cache: the page cache is dropped before the conversion and before the floor
(needs root; reported as n/a otherwise).

    python bench/bench_scale.py [--dense-gb 2 4] [--deepseek-gb 2 4] [--workers 1 2] [--workdir /tmp/bench_scale] [--no-cold]

`--workers 1 2` also measures `convert.py --workers 2` (each worker converts one pipeline stage).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_deepseek  # noqa: E402
import bench_dense  # noqa: E402
from common import ROOT, dir_bytes, raw_floor, run_measured  # noqa: E402

DENSE_FLAGS = ["--loader", "hf", "--saver", "core_ext", "--target-tensor-parallel-size", "2",
               "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local"]
DEEPSEEK_FLAGS = ["--loader", "hf_deepseek3", "--saver", "core_ext", "--target-tensor-parallel-size", "2",
                  "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2", "--mtp-num-layers", "1",
                  "--saver-transformer-impl", "local"]


def drop_caches() -> bool:
    """Empty the page cache so that the next read comes from the device (root only)."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def largest_layer(src: Path) -> int:
    """Bytes of the largest HF layer (or of the embedding, whichever is larger)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for name, file in index.items():
        parts = name.split(".")
        group = ".".join(parts[:3]) if name.startswith("model.layers.") else name
        with safe_open(str(src / file), "pt") as f:
            sl = f.get_slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
        sizes[group] = sizes.get(group, 0) + numel * 2
    return max(sizes.values())


def measure(src: Path, out: Path, flags: list[str], cold: bool, extra: list[str]) -> dict[str, float] | None:
    if cold and not drop_caches():
        return None
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", "--load-dir", str(src), "--save-dir", str(out),
           *flags, *extra]
    wall, peak, _ = run_measured(cmd, drop_caches if cold else None)
    out_bytes = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        drop_caches()
    floor = raw_floor(src, out_bytes, src.parent / "floor.bin")
    direct = raw_floor(src, out_bytes, src.parent / "floor.bin", direct=True)
    return {"wall": wall, "floor": floor, "direct": direct, "pss": peak["pss_sum"], "out": out_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-gb", type=float, nargs="*", default=[2.0, 4.0])
    parser.add_argument("--deepseek-gb", type=float, nargs="*", default=[2.0, 4.0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_scale"))
    parser.add_argument("--no-cold", action="store_true", help="Warm-cache figures only")
    parser.add_argument("--no-checksums", action="store_true", help="Pass --no-checksums to the saver")
    parser.add_argument("--workers", type=int, nargs="*", default=[1], help="convert.py --workers values to measure")
    args = parser.parse_args()
    extra = ["--no-checksums"] if args.no_checksums else []
    models = [("dense", gb, bench_dense.make_model, DENSE_FLAGS) for gb in args.dense_gb]
    models += [("deepseek", gb, bench_deepseek.make_model, DEEPSEEK_FLAGS) for gb in args.deepseek_gb]
    print(f"{'model':>9} {'layers':>6} {'in GB':>6} {'out GB':>6} {'cache':>5} {'workers':>7} {'wall s':>7} {'GB/s':>5} {'floor s':>7} "
          f"{'x floor':>7} {'O_DIRECT floor s':>16} {'x':>5} {'peak PSS GB':>11} {'layer GB':>8} {'1 GB + 2 layers':>15}", flush=True)
    for family, gb, make, flags in models:
        shutil.rmtree(args.workdir, ignore_errors=True)
        src = args.workdir / "hf"
        cfg = make(src, gb)
        in_bytes, layer = dir_bytes(src), largest_layer(src)
        raw_floor(src, 0, args.workdir / "warmup.bin")  # warm the cache with the input
        for cache, workers in ((c, w) for c in ("warm", "cold") for w in args.workers):
            if cache == "cold" and args.no_cold:
                continue
            r = measure(src, args.workdir / "out", flags, cache == "cold", [*extra, "--workers", str(workers)])
            if r is None:
                print(f"{family:>9} {cfg['num_hidden_layers']:>6} {'':>6} {'':>6} {cache:>5}  n/a (dropping the page cache needs root)")
                continue
            budget = 1e9 + 2 * layer
            print(f"{family:>9} {cfg['num_hidden_layers']:>6} {in_bytes / 1e9:6.2f} {r['out'] / 1e9:6.2f} {cache:>5} {workers:>7} "
                  f"{r['wall']:7.2f} {in_bytes / r['wall'] / 1e9:5.2f} {r['floor']:7.2f} {r['wall'] / r['floor']:7.2f} "
                  f"{r['direct']:16.2f} {r['wall'] / r['direct']:5.2f} "
                  f"{r['pss'] / 1e9:11.3f} {layer / 1e9:8.3f} {str(r['pss'] <= budget):>15}", flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    if os.environ.get("CI"):
        print("(figures from a CI machine are indicative only)")


if __name__ == "__main__":
    main()
