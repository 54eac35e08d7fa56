"""Upstream Megatron-LM's own tools/checkpoint/convert.py, loader_core and saver_core next to our plugins,
from the snapshots in ../shared/megatron-lm (extracted once per run into a temporary directory, our plugins
installed with install.py; tests/upstream.py says what its CPU shim patches). The checkpoints upstream
writes are loaded strict=True into megatron-core and compared with transformers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import upstream
from mcore_harness import mcore_logits, read_args
from util import (
    assert_same_tensors,
    convert_inprocess,
    make_deepseek_model,
    make_hf_model,
    missing_here,
    read_mcore_dir,
    read_safetensors_dir,
)

MINDSPORE = Path(__file__).resolve().parent / "fixtures" / "mindspore"
TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
TP2PP2 = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]


@pytest.fixture(scope="session")
def megatron(tmp_path_factory):
    """megatron(version) -> the extracted checkout with our plugins installed (once per run and version)."""
    made: dict[str, Path] = {}

    def checkout(version: str) -> Path:
        why = upstream.available(version)
        if why:
            missing_here(why)
        if version not in made:
            made[version] = upstream.extract(version, tmp_path_factory.mktemp(f"megatron-{version}"))
        return made[version]

    return checkout


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Tiny bf16 Llama and Qwen2 (saved once)."""
    root = tmp_path_factory.mktemp("hf")
    for family in ("llama", "qwen2"):
        make_hf_model(family, root / family, dtype=torch.bfloat16)
    return root


@pytest.fixture(scope="session")
def saved_by_upstream(megatron, hf_models, tmp_path_factory):
    """upstream saver_core's TP2xPP2 checkpoint of a bf16 HF model: family -> directory (converted once)."""
    made: dict[str, Path] = {}

    def saved(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"upstream-{family}") / "mc"
            result = upstream.convert(megatron("core_r0.12.0"), "core_r0.12.0", "--loader", "hf", "--saver", "core",
                                      "--load-dir", hf_models / family, "--save-dir", out, *TP2PP2, "--saver-transformer-impl", "local")
            assert_written_by_upstream(result, out)
            made[family] = out
        return made[family]

    return saved


def assert_written_by_upstream(result, out: Path) -> None:
    """Upstream convert.py exits 0 even when its saver died: the checkpoint must be there, and be upstream's."""
    assert result.returncode == 0 and (out / "latest_checkpointed_iteration.txt").exists(), upstream.output(result)
    assert "Loaded saver_core as the saver." in result.stdout and not (out / "conversion_manifest.json").exists()


def reference_logits(hf_dir: Path, bf16: bool) -> torch.Tensor:
    """transformers' fp32 logits, the weights first rounded to bf16 when the checkpoint holds bf16."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if bf16:
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        return model(TOKENS).logits


def check_written_checkpoint(ckpt: Path, hf_dir: Path, tp: int, pp: int, dtype: torch.dtype) -> float:
    args, _ = read_args(ckpt)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.params_dtype) == (tp, pp, dtype)
    reference = reference_logits(hf_dir, bf16=dtype == torch.bfloat16)
    return (mcore_logits(ckpt, TOKENS)[..., :reference.shape[-1]] - reference).abs().max().item()


# a. Seed 002's MindSpore command, unchanged, under core_r0.12.0's convert.py with upstream saver_core.
def test_seed_002_mindspore_to_upstream_saver_core(megatron, tmp_path):
    checkout = megatron("core_r0.12.0")
    out = tmp_path / "mc"
    result = upstream.convert(
        checkout, "core_r0.12.0", "--loader", "core_mf", "--saver", "core", *TP2PP2,
        "--load-dir", MINDSPORE / "llama_legacy", "--save-dir", out, "--loader-transformer-impl", "local",
        "--saver-transformer-impl", "local", "--position-embedding-type", "rope", "--true-vocab-size", "100",
        "--padded-vocab-size", "100", "--num-layers", "2", "--seq-length", "128", "--hidden-size", "64",
        "--ffn-hidden-size", "96", "--num-attention-heads", "4", "--num-query-groups", "2", "--normalization", "RMSNorm", "--swiglu")
    assert_written_by_upstream(result, out)
    diff = check_written_checkpoint(out, MINDSPORE / "hf_llama", 2, 2, torch.bfloat16)
    print(f"MindSpore llama_legacy -> upstream saver_core TP2xPP2: logits max abs diff {diff:.2e} (bf16-rounded reference)")
    assert diff < 1e-4


# b. loader_hf -> upstream saver_core at TP2xPP2.
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_to_upstream_saver_core_logits(saved_by_upstream, hf_models, family):
    diff = check_written_checkpoint(saved_by_upstream(family), hf_models / family, 2, 2, torch.bfloat16)
    print(f"{family} -> upstream saver_core TP2xPP2: logits max abs diff {diff:.2e} (bf16-rounded reference)")
    assert diff < 1e-4


# c. upstream loader_core reading upstream saver_core's checkpoint -> our savers.
def test_upstream_loader_core_to_our_hf_saver_is_bit_exact(megatron, saved_by_upstream, hf_models, tmp_path):
    result = upstream.convert(megatron("core_r0.12.0"), "core_r0.12.0", "--loader", "core", "--saver", "hf",
                              "--load-dir", saved_by_upstream("llama"), "--save-dir", tmp_path / "hf",
                              "--loader-transformer-impl", "local", "--true-vocab-size", "100", "--hf-config-dir", hf_models / "llama")
    assert result.returncode == 0 and (tmp_path / "hf" / "config.json").exists(), upstream.output(result)
    assert "Loaded loader_core as the loader." in result.stdout
    assert_same_tensors(read_safetensors_dir(hf_models / "llama"), read_safetensors_dir(tmp_path / "hf"))


def test_upstream_loader_core_to_our_core_ext_saver_matches_direct_conversion(megatron, saved_by_upstream, hf_models, tmp_path):
    layout = ["--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "4", "--saver-transformer-impl", "local"]
    result = upstream.convert(megatron("core_r0.12.0"), "core_r0.12.0", "--loader", "core", "--saver", "core_ext",
                              "--load-dir", saved_by_upstream("llama"), "--save-dir", tmp_path / "via_upstream",
                              "--loader-transformer-impl", "local", "--true-vocab-size", "100", *layout)
    assert result.returncode == 0 and (tmp_path / "via_upstream" / "latest_checkpointed_iteration.txt").exists(), upstream.output(result)
    convert_inprocess("hf", "core_ext", hf_models / "llama", tmp_path / "direct", *layout)
    got, want = read_mcore_dir(tmp_path / "via_upstream"), read_mcore_dir(tmp_path / "direct")
    assert sorted(got) == sorted(want) and len(got) == 4
    for rank in want:
        assert_same_tensors(want[rank], got[rank])


# d. Models upstream saver_core cannot hold: one error line, non-zero exit, no hang, nothing written.
@pytest.fixture(scope="session")
def other_models(tmp_path_factory):
    """A tiny fp32 Qwen3 (q/k norm) and DeepSeek-V3 (MLA, MoE, MTP layer), saved once."""
    root = tmp_path_factory.mktemp("other_models")
    make_hf_model("qwen3", root / "qwen3", num_layers=2)
    make_deepseek_model(root / "deepseek3")
    return root


@pytest.mark.parametrize("model,loader,reasons", [
    ("qwen3", "hf", ["q/k layernorm"]),
    ("deepseek3", "hf_deepseek3", ["multi-latent attention", "MoE"]),
])
def test_model_upstream_saver_core_cannot_hold_is_refused(megatron, other_models, tmp_path, model, loader, reasons):
    try:
        result = upstream.convert(megatron("core_r0.12.0"), "core_r0.12.0", "--loader", loader, "--saver", "core",
                                  "--load-dir", other_models / model, "--save-dir", tmp_path / "mc", "--saver-transformer-impl", "local",
                                  timeout=120, debug=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{model} -> upstream saver_core hung (no exit within 120 s)")
    errors = upstream.error_lines(result)
    assert result.returncode != 0 and len(errors) == 1, upstream.output(result)
    assert "saver_core" in errors[0] and all(r in errors[0] for r in reasons), errors[0]
    assert "Traceback" not in result.stderr, upstream.output(result)
    assert not (tmp_path / "mc").exists()


# e. Megatron-LM main's own convert.py: hf_deepseek3 -> our saver_core_ext, naming of the checkout's release.
def test_main_convert_deepseek3_with_mtp_to_core_ext(megatron, other_models, tmp_path):
    from transformers import AutoModelForCausalLM

    import mcore_versions
    from test_parity import mtp_reference

    out = tmp_path / "mc"
    result = upstream.convert(megatron("main"), "main", "--loader", "hf_deepseek3", "--saver", "core_ext",
                              "--load-dir", other_models / "deepseek3", "--save-dir", out, "--mtp-num-layers", "1",
                              "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--saver-transformer-impl", "local")
    assert result.returncode == 0 and (out / "latest_checkpointed_iteration.txt").exists(), upstream.output(result)
    args, _ = read_args(out)
    assert args.target_mcore_version == "0.20"  # main's megatron/core/package_info.py says 0.20.0
    names = {k for sd in read_mcore_dir(out).values() for k in sd}
    assert any(k.startswith("mtp.layers.0.mtp_model_layer.") for k in names)
    assert not any(k.startswith("mtp.layers.0.transformer_layer.") for k in names)
    if mcore_versions.missing("0.19.2"):
        pytest.skip("megatron-core 0.19.2 is not provisioned (make env): logits not checked")
    outputs = mcore_versions.outputs_under("0.19.2", out, TOKENS)
    model = AutoModelForCausalLM.from_pretrained(other_models / "deepseek3", dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    mtp = {k.removeprefix(f"model.layers.{layers}."): v for k, v in read_safetensors_dir(other_models / "deepseek3").items()
           if k.startswith(f"model.layers.{layers}.")}
    with torch.no_grad():
        diff = (outputs["logits"][..., :100] - model(TOKENS).logits).abs().max().item()
    mtp_diff = (outputs["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    print(f"main convert.py DeepSeek-V3 TP2xEP2 under megatron-core 0.19.2: logits max abs diff {diff:.2e}, MTP {mtp_diff:.2e}")
    assert diff < 1e-4 and mtp_diff < 1e-4
