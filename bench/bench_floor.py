"""Benchmark: both directions against the device floor of the same run, the table issue 18 asks for.

For each model (dense Llama-shaped and DeepSeek-V3-shaped with MLA/MoE/MTP, synthetic bf16, at each size) it
times, with convert.py's default options (rank files hashed with blake3, HF shards with sha256) and a warm cache:
- HF -> mcore (dense TP2xPP2, DeepSeek TP2xPP2xEP2 + MTP), at each `--workers` value,
- mcore -> HF from that output (one 5 GB-shard export),
and prints per run the wall time, the device floor measured right after it (read the input from the page cache +
write as many bytes through O_DIRECT + fsync), wall / floor, the fixed start-up (the same conversion of a tiny
model), the steady-state GB/s (output bytes over wall less start-up), peak PSS of the process tree, and whether
it is within 1.5x the floor (plus the start-up at 4 GB and below).

    python bench/bench_floor.py [--dense-gb 4 16] [--deepseek-gb 4 16] [--workers 1 auto] [--workdir /tmp/bench_floor]

Disk: the input, the output and a scratch file of the output's size at once (about 3x the model).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_deepseek  # noqa: E402
import bench_dense  # noqa: E402
from bench_scale import DEEPSEEK_FLAGS, DENSE_FLAGS, largest_layer  # noqa: E402
from common import ROOT, dir_bytes, raw_floor, run_measured  # noqa: E402


def convert(*argv: str | Path) -> tuple[float, dict[str, int]]:
    wall, peak, _ = run_measured([sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", *map(str, argv)])
    return wall, peak


def import_(hf: Path, out: Path, flags: list[str], workers: str) -> tuple[float, dict[str, int]]:
    shutil.rmtree(out, ignore_errors=True)
    return convert(*flags, "--load-dir", hf, "--save-dir", out, "--workers", workers)


def export(mcore: Path, hf_config: Path, out: Path) -> tuple[float, dict[str, int]]:
    shutil.rmtree(out, ignore_errors=True)
    return convert("--loader", "core_ext", "--saver", "hf", "--load-dir", mcore, "--save-dir", out, "--hf-config-dir", hf_config)


def start_ups(w: Path) -> tuple[float, float]:
    """The fixed cost of each direction: the conversion of a tiny model (imports and page cache warmed first)."""
    bench_dense.make_model(w / "tiny", 0, hidden=64, ffn=128, heads=4, groups=2, vocab=256)
    runs = [(import_(w / "tiny", w / "tiny-mcore", DENSE_FLAGS, "1")[0], export(w / "tiny-mcore", w / "tiny", w / "tiny-hf")[0])
            for _ in range(3)]
    shutil.rmtree(w / "tiny-hf")
    return min(r[0] for r in runs[1:]), min(r[1] for r in runs[1:])


def row(direction: str, family: str, size: float, workers: str, wall: float, floor: float, start_up: float,
        out_bytes: int, peak: dict[str, int], budget: float | None) -> None:
    limit = 1.5 * floor + (start_up if size <= 4 else 0.0)
    pss = peak["pss_sum"] / 1e9
    print(f"{direction:>11} {family:>8} {size:5.1f} {workers:>7} {wall:7.2f} {floor:7.2f} {wall / floor:7.2f} {start_up:8.2f} "
          f"{limit:7.2f} {str(wall <= limit):>6} {out_bytes / max(wall - start_up, 1e-9) / 1e9:11.2f} {pss:8.3f} "
          f"{'' if budget is None else f'{budget / 1e9:.3f} ' + str(pss * 1e9 <= budget):>12}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-gb", type=float, nargs="*", default=[4.0, 16.0])
    parser.add_argument("--deepseek-gb", type=float, nargs="*", default=[4.0, 16.0])
    parser.add_argument("--workers", nargs="+", default=["1", "auto"], help="convert.py --workers values (HF -> mcore)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_floor"))
    args = parser.parse_args()
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    to_mcore, to_hf = start_ups(w)
    print(f"start-up: HF -> mcore {to_mcore:.2f} s, mcore -> HF {to_hf:.2f} s (tiny model)")
    print(f"{'direction':>11} {'model':>8} {'GB':>5} {'workers':>7} {'wall s':>7} {'floor s':>7} {'x floor':>7} {'start-up':>8} "
          f"{'limit s':>7} {'within':>6} {'steady GB/s':>11} {'PSS GB':>8} {'PSS budget':>12}", flush=True)
    models = [("dense", gb, bench_dense.make_model, DENSE_FLAGS) for gb in args.dense_gb]
    models += [("deepseek", gb, bench_deepseek.make_model, DEEPSEEK_FLAGS) for gb in args.deepseek_gb]
    for family, gb, make, flags in models:
        hf, mcore, out = w / "hf", w / "mcore", w / "out"
        make(hf, gb)
        layer = largest_layer(hf)
        raw_floor(hf, 0, w / "warm.bin")  # the input in the page cache
        for workers in args.workers:
            wall, peak = import_(hf, mcore, flags, workers)
            out_bytes = dir_bytes(mcore)
            floor = raw_floor(hf, out_bytes, w / "floor.bin", direct=True)
            row("HF->mcore", family, gb, workers, wall, floor, to_mcore, out_bytes, peak, None)
        for f in hf.glob("*.safetensors"):  # config.json stays, for --hf-config-dir
            f.unlink()
        raw_floor(mcore, 0, w / "warm.bin", pattern="*.pt")
        wall, peak = export(mcore, hf, out)
        out_bytes = dir_bytes(out)
        shutil.rmtree(out)
        floor = raw_floor(mcore, out_bytes, w / "floor.bin", direct=True, pattern="*.pt")
        row("mcore->HF", family, gb, "1", wall, floor, to_hf, out_bytes, peak, 1e9 + 2 * layer)
        shutil.rmtree(hf)
        shutil.rmtree(mcore)
    shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
