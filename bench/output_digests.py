"""Print one digest per conversion of a fixed matrix of tiny models, to prove a refactor leaves every
output byte unchanged: run before and after, compare the two listings (`diff`).

    python bench/output_digests.py > before.txt   # ... change the code ...
    python bench/output_digests.py > after.txt && diff before.txt after.txt

A digest covers every file's bytes, and of conversion_manifest.json everything but the creation time,
command line, versions and the per-file digests (whose algorithm `--checksum` chooses; the files' bytes are covered).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tests")]

from util import DEEPSEEK_LAYOUTS, convert_inprocess, make_deepseek_model, make_hf_model  # noqa: E402

DENSE = {
    "tp2pp2": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"],
    "vpp": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "local": ["--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local"],
    "torch_dist": ["--target-tensor-parallel-size", "2", "--ckpt-format", "torch_dist"],
    "bf16": ["--target-pipeline-parallel-size", "2", "--params-dtype", "bf16"],
    "nf4": ["--target-tensor-parallel-size", "2", "--qlora-nf4"],
}
DEEPSEEK = {
    **DEEPSEEK_LAYOUTS,
    "mindspeed": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--naming", "mindspeed",
                  "--moe-grouped-gemm"],
    "mm_split": ["--target-tensor-parallel-size", "2", "--naming", "mindspeed", "--mla-mm-split", "--moe-grouped-gemm",
                 "--moe-tp-extend-ep"],
    "te_grouped": ["--target-expert-parallel-size", "2", "--moe-grouped-gemm"],
    "target_0.12": ["--target-pipeline-parallel-size", "2", "--target-mcore-version", "0.12"],
}


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(directory)).encode())
        data = f.read_bytes()
        if f.name == "conversion_manifest.json":
            doc = json.loads(data)
            doc["files"] = {rel: info["bytes"] for rel, info in doc["files"].items()}  # their bytes are digested already
            data = json.dumps({k: doc.get(k) for k in ("files", "tensors", "target")}, sort_keys=True).encode()
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def run(name: str, loader: str, saver: str, src: Path, out: Path, *flags: str) -> Path:
    with contextlib.redirect_stdout(sys.stderr):  # the conversions' summaries
        convert_inprocess(loader, saver, src, out, *flags)
    if "torch_dist" not in flags:  # torch.distributed.checkpoint's metadata differs run to run: read back instead
        print(f"{name:32s} {digest(out)}", flush=True)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        make_hf_model("llama", t / "llama", num_layers=4)
        make_hf_model("qwen2", t / "qwen2", num_layers=4)
        make_deepseek_model(t / "ds")
        for family in ("llama", "qwen2"):
            for name, flags in DENSE.items():
                out = run(f"{family}/{name}", "hf", "core_ext", t / family, t / f"{family}-{name}", *flags)
                if name == "torch_dist":
                    run(f"{family}/{name}/torch", "core_ext", "core_ext", out, t / f"{family}-{name}-torch",
                        "--target-tensor-parallel-size", "2")
                elif name != "nf4":
                    run(f"{family}/{name}/hf", "core_ext", "hf", out, t / f"{family}-{name}-hf", "--hf-config-dir", str(t / family))
            run(f"{family}/reshard", "core_ext", "core_ext", t / f"{family}-tp2pp2", t / f"{family}-reshard",
                "--target-pipeline-parallel-size", "4")
        for name, flags in DEEPSEEK.items():
            out = run(f"deepseek/{name}", "hf_deepseek3", "core_ext", t / "ds", t / f"ds-{name}", "--mtp-num-layers", "1", *flags)
            run(f"deepseek/{name}/hf", "core_ext", "hf", out, t / f"ds-{name}-hf", "--hf-config-dir", str(t / "ds"))
            if name in ("tp2pp2ep2", "mindspeed"):
                run(f"deepseek/{name}/reshard", "core_ext", "core_ext", out, t / f"ds-{name}-reshard",
                    "--target-expert-parallel-size", "4")


if __name__ == "__main__":
    main()
