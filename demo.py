"""Demo: tiny Llama built locally -> Megatron-Core TP2xPP2 -> HF, with a logits parity check.

Run with `make demo`. Nothing is downloaded: the model is random, made with transformers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tests")]

from mcore_harness import mcore_logits  # noqa: E402
from util import hf_logits, make_hf_model, read_safetensors_dir  # noqa: E402


def run(*argv: str) -> None:
    cmd = [sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", *argv]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    out = ROOT / "demo_out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    model = make_hf_model("llama", out / "hf", num_layers=4)
    print(f"built a tiny Llama (GQA 4 heads / 2 groups, 4 layers) in {out / 'hf'}")
    run("--loader", "hf", "--saver", "core_ext", "--load-dir", str(out / "hf"), "--save-dir", str(out / "mcore"),
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local")
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(model, tokens)
    ours = mcore_logits(out / "mcore", tokens)[..., : reference.shape[-1]]
    diff = (ours - reference).abs().max().item()
    run("--loader", "core_ext", "--saver", "hf", "--load-dir", str(out / "mcore"), "--save-dir", str(out / "hf_back"))
    before, after = read_safetensors_dir(out / "hf"), read_safetensors_dir(out / "hf_back")
    exact = sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    print()
    print("summary")
    print(f"  logits, megatron-core TP2xPP2 (4 CPU processes) vs transformers: max abs diff {diff:.2e} "
          f"({'PASS' if diff < 1e-4 else 'FAIL'}, threshold 1e-4, fp32)")
    print(f"  HF -> mcore -> HF round trip: {len(before)} tensors {'bit-exact' if exact else 'DIFFER'}")
    print(f"  total {time.perf_counter() - start:.1f} s; outputs in {out}")
    if diff >= 1e-4 or not exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
