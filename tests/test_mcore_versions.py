"""Converted checkpoints in other real megatron-core releases than the venv's 0.16.1: 0.12.1 and 0.19.2
(installed by `make env` under .venv/side/, run by tests/mcore_versions.py in a child process that
asserts which release it imported), every rank loaded strict on CPU, logits against transformers in
fp32. Each run is one process per rank (7-20 s on 2 cores), so one dense and a few DeepSeek-V3 layouts.
megatron-core 0.12.1 refuses TP > 1 with EP > 1 on CPU (it requires sequence parallelism), hence PP2xEP2
there; 0.17+ name the MTP layer's submodule `mtp_model_layer` (`--target-mcore-version`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcore_versions import ROOT, SIDE, mcore_path, missing, outputs_under
from test_parity import mtp_reference
from util import (
    assert_same_tensors,
    convert_inprocess,
    hf_logits,
    make_deepseek_model,
    make_hf_model,
    missing_here,
    read_mcore_dir,
    read_safetensors_dir,
)

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
TP2 = ["--target-tensor-parallel-size", "2"]
PP2 = ["--target-pipeline-parallel-size", "2"]
EP2 = ["--target-expert-parallel-size", "2"]


def require(version: str) -> None:
    """Skip where `make env` has not installed the release, except under CI, where that is a failure."""
    gone = missing(version)
    if not gone:
        return
    missing_here(f"megatron-core {version} is not installed ({', '.join(map(str, gone))} missing; run `make env`)")


@pytest.mark.parametrize("version", ["0.12.1", "0.19.2"])
def test_llama_tp2pp2(tmp_path, version):
    require(version)
    model = make_hf_model("llama", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--saver-transformer-impl", "local", *TP2, *PP2)
    out = outputs_under(version, tmp_path / "mc", TOKENS)
    diff = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    print(f"megatron-core {version} llama TP2xPP2: logits max abs diff {diff:.2e}")
    assert diff < 1e-4


DEEPSEEK = {  # id: (release, layout flags, names written for)
    "0.12.1-pp2ep2": ("0.12.1", [*PP2, *EP2], ["--target-mcore-version", "0.12"]),
    "0.19.2-tp2ep2": ("0.19.2", [*TP2, *EP2], ["--target-mcore-version", "0.19"]),
    "0.19.2-pp2ep2": ("0.19.2", [*PP2, *EP2], ["--target-mcore-version", "0.19"]),
}


@pytest.mark.parametrize("case", list(DEEPSEEK))
def test_deepseek_mtp(tmp_path, case):
    """MLA, MoE and the MTP layer: main logits against transformers, MTP logits against the reference
    built from the HF model's modules (test_parity.mtp_reference)."""
    version, layout, target = DEEPSEEK[case]
    require(version)
    model, mtp = make_deepseek_model(tmp_path / "hf")
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "hf", tmp_path / "mc", "--saver-transformer-impl", "local",
                      "--mtp-num-layers", "1", *target, *layout)
    expected = "mtp_model_layer" if tuple(map(int, version.split(".")[:2])) >= (0, 17) else "transformer_layer"
    submodules = {k.split(".")[3] for sd in read_mcore_dir(tmp_path / "mc").values() for k in sd if k.startswith("mtp.layers.0.")}
    assert submodules & {"transformer_layer", "mtp_model_layer"} == {expected}, submodules
    out = outputs_under(version, tmp_path / "mc", TOKENS)
    main_diff = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    mtp_diff = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    print(f"megatron-core {case}: logits max abs diff {main_diff:.2e}, MTP logits {mtp_diff:.2e}")
    assert main_diff < 1e-4 and mtp_diff < 1e-4


def test_side_releases_stay_off_the_venv_path():
    """The venv itself still imports its own megatron-core (0.16.1) and no triton."""
    import importlib.util

    import megatron.core
    import megatron.core.package_info

    assert megatron.core.package_info.__version__ == "0.16.1"
    assert SIDE.resolve() not in Path(megatron.core.__file__).resolve().parents
    assert importlib.util.find_spec("triton") is None


def test_torch_dist_written_and_read_by_0192(tmp_path):
    """Our torch_dist code against the megatron-core on the path: 0.19.2 writes the checkpoint (its common
    state inside the checkpoint, no common.pt), loads it at EP2 with MTP, and our loader reads it back."""
    require("0.19.2")
    model, mtp = make_deepseek_model(tmp_path / "hf")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, mcore_path("0.19.2")))}
    printed = []
    for argv in (["--loader", "hf_deepseek3", "--saver", "core_ext", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "td",
                  "--ckpt-format", "torch_dist", "--mtp-num-layers", "1", *EP2],
                 ["--loader", "core_ext", "--saver", "hf", "--load-dir", tmp_path / "td", "--save-dir", tmp_path / "back"]):
        run = subprocess.run([sys.executable, ROOT / "convert.py", "--model-type", "GPT", *map(str, argv)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        printed.append(run.stdout)
    assert "names of megatron-core 0.19 (megatron-core writing torch_dist)" in printed[0]
    assert not list((tmp_path / "td").rglob("common.pt"))
    assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "back"))
    out = outputs_under("0.19.2", tmp_path / "td", TOKENS, layout=(1, 1, 2))
    main_diff = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    mtp_diff = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    print(f"megatron-core 0.19.2 torch_dist at EP2: logits max abs diff {main_diff:.2e}, MTP logits {mtp_diff:.2e}")
    assert main_diff < 1e-4 and mtp_diff < 1e-4
