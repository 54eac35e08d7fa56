"""Benchmark: Megatron-Core -> HF (loader core_ext, saver hf), the export direction.

Generates a synthetic bf16 HF checkpoint (dense Llama-shaped, or DeepSeek-V3-shaped with `--deepseek`), converts it
to Megatron-Core TP2xPP2 (xEP2 with MTP for DeepSeek; not timed), then times the export back to HF at each
`--max-shard-size` with convert.py (default options: sha256 on, one worker; warm cache: the rank files were just read),
and with `--reshard` a core_ext -> core_ext reshard to TP1xPP4 (default options: blake3), and prints per run:
- wall time against the device floor of the same run (read the rank files from the page cache + write as many bytes
  through O_DIRECT + fsync, measured right after the export),
- the fixed start-up cost (the export of a tiny model, same run), and the steady-state GB/s (output bytes over the
  wall time less the start-up),
- peak PSS of the process tree (loader + saver; shared pages once) against 1 GB + 2x the largest layer (embedding
  included), which must hold whatever the shard size.

    python bench/bench_export.py [--size-gb 4] [--shard-sizes 5GB 1GB] [--deepseek] [--reshard] [--workdir /tmp/bench_export]
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


RESHARD = ["--saver", "core_ext", "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "4",
           "--saver-transformer-impl", "local"]


def export(mcore: Path, hf: Path, out: Path, shard_size: str | None) -> tuple[float, dict[str, int]]:
    """To HF shards of at most `shard_size`, or (None) a core_ext reshard to TP1xPP4."""
    shutil.rmtree(out, ignore_errors=True)
    target = RESHARD if shard_size is None else ["--saver", "hf", "--hf-config-dir", hf, "--max-shard-size", shard_size]
    return convert("--loader", "core_ext", "--load-dir", mcore, "--save-dir", out, *target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--shard-sizes", nargs="+", default=["5GB", "1GB"])
    parser.add_argument("--deepseek", action="store_true", help="DeepSeek-V3-shaped (MLA, MoE, MTP) instead of dense")
    parser.add_argument("--reshard", action="store_true", help="Also time a core_ext -> core_ext reshard to TP1xPP4")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_export"))
    args = parser.parse_args()
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)

    bench_dense.make_model(w / "tiny", 0, hidden=64, ffn=128, heads=4, groups=2, vocab=256)
    convert(*DENSE_FLAGS, "--load-dir", w / "tiny", "--save-dir", w / "tiny-mcore")
    export(w / "tiny-mcore", w / "tiny", w / "out", "5GB")  # imports and the page cache warmed
    start_up = min(export(w / "tiny-mcore", w / "tiny", w / "out", "5GB")[0] for _ in range(2))

    make, flags = (bench_deepseek.make_model, DEEPSEEK_FLAGS) if args.deepseek else (bench_dense.make_model, DENSE_FLAGS)
    cfg = make(w / "hf", args.size_gb)
    layer = largest_layer(w / "hf")
    convert(*flags, "--load-dir", w / "hf", "--save-dir", w / "mcore")
    for f in (w / "hf").glob("*.safetensors"):  # config.json stays, for --hf-config-dir
        f.unlink()
    in_bytes, budget = dir_bytes(w / "mcore"), 1e9 + 2 * layer
    kind = "DeepSeek-V3-shaped TP2xPP2xEP2 + MTP" if args.deepseek else "dense TP2xPP2"
    print(f"{kind}, {cfg['num_hidden_layers']} layers, {in_bytes / 1e9:.2f} GB of rank files -> HF; start-up {start_up:.2f} s "
          f"(tiny model); largest layer {layer / 1e9:.3f} GB, PSS budget 1 GB + 2 layers = {budget / 1e9:.3f} GB", flush=True)
    print(f"{'shard size':>10} {'out GB':>6} {'wall s':>7} {'floor s':>7} {'x floor':>7} {'steady GB/s':>11} "
          f"{'floor GB/s':>10} {'peak PSS GB':>11} {'within':>6}", flush=True)
    for size in [*args.shard_sizes, *([None] if args.reshard else [])]:
        raw_floor(w / "mcore", 0, w / "warm.bin", pattern="*.pt")  # the rank files in the page cache
        wall, peak = export(w / "mcore", w / "hf", w / "out", size)
        out_bytes = dir_bytes(w / "out")
        shutil.rmtree(w / "out")
        floor = raw_floor(w / "mcore", out_bytes, w / "floor.bin", direct=True, pattern="*.pt")
        print(f"{size or 'TP1xPP4':>10} {out_bytes / 1e9:6.2f} {wall:7.2f} {floor:7.2f} {wall / floor:7.2f} "
              f"{out_bytes / max(wall - start_up, 1e-9) / 1e9:11.2f} {out_bytes / floor / 1e9:10.2f} "
              f"{peak['pss_sum'] / 1e9:11.3f} {str(peak['pss_sum'] <= budget):>6}", flush=True)
    shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
