"""loader_core_mf on real MindSpore Transformers checkpoints (made by mindformers 1.9.0's converters,
see tests/fixtures/make_mindspore_fixtures.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore_harness import mcore_logits
from util import assert_same_tensors, convert_cli, convert_inprocess, read_safetensors_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mindspore"
CASES = {  # fixture -> (HF original, loader flags)
    "qwen3_interleaved": ("hf_qwen3", []),
    "qwen3_contiguous": ("hf_qwen3", ["--qkv-layout", "contiguous", "--fc1-layout", "contiguous"]),
    "llama_legacy": ("hf_llama", ["--num-attention-heads", "4"]),
    "llama_legacy_fused": ("hf_llama", ["--num-attention-heads", "4"]),
    "qwen3_optimizer": ("hf_qwen3", []),
}


@pytest.mark.parametrize("fixture", list(CASES))
def test_fixture_to_hf_reproduces_the_original(tmp_path, fixture):
    original, flags = CASES[fixture]
    convert_inprocess("core_mf", "hf", FIXTURES / fixture / "ms.safetensors", tmp_path / "hf", "--params-dtype", "fp32", *flags)
    assert_same_tensors(read_safetensors_dir(FIXTURES / original), read_safetensors_dir(tmp_path / "hf"))


def test_wrong_layout_flag_is_caught(tmp_path):
    """Negative control: reading the contiguous checkpoint with the default (interleaved) layouts."""
    convert_inprocess("core_mf", "hf", FIXTURES / "qwen3_contiguous" / "ms.safetensors", tmp_path / "hf", "--params-dtype", "fp32")
    got, want = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(FIXTURES / "hf_qwen3")
    assert not torch.equal(got["model.layers.0.mlp.gate_proj.weight"], want["model.layers.0.mlp.gate_proj.weight"])
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], want["model.layers.0.self_attn.q_proj.weight"])


def test_default_dtype_is_bf16_rounded_once(tmp_path):
    convert_inprocess("core_mf", "hf", FIXTURES / "qwen3_interleaved", tmp_path / "hf")
    got, want = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(FIXTURES / "hf_qwen3")
    for name, t in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16)), name


@pytest.mark.parametrize("fixture", ["qwen3_interleaved", "qwen3_contiguous", "llama_legacy"])
def test_tp2_logits_match_the_hf_model(tmp_path, fixture):
    from transformers import AutoModelForCausalLM

    original, flags = CASES[fixture]
    convert_inprocess("core_mf", "core_ext", FIXTURES / fixture / "ms.safetensors", tmp_path / "mc", "--params-dtype", "fp32",
                      "--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local", *flags)
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / original, dtype=torch.float32).eval()
    tokens = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).logits
    assert (mcore_logits(tmp_path / "mc", tokens)[..., :100] - reference).abs().max().item() < 1e-4


def test_optimizer_states_are_skipped_and_reported(tmp_path):
    result = convert_cli("--loader", "core_mf", "--saver", "core_ext", "--load-dir", str(FIXTURES / "qwen3_optimizer"),
                         "--save-dir", str(tmp_path / "mc"), "--saver-transformer-impl", "local")
    assert result.returncode == 0, result.stderr
    assert "skipped 11 non-weight entries" in result.stdout and "format 'ms'" in result.stdout


def _with_extra_tensor(tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    tensors = load_file(FIXTURES / "qwen3_interleaved" / "ms.safetensors")
    tensors[name] = torch.zeros(4)
    save_file(tensors, src / "ms.safetensors", metadata={"format": "ms"})
    return src


def test_unknown_tensor_fails_naming_it(tmp_path):
    src = _with_extra_tensor(tmp_path, "decoder.layers.0.mlp.mystery.weight")
    result = convert_cli("--loader", "core_mf", "--saver", "core_ext", "--load-dir", str(src), "--save-dir", str(tmp_path / "mc"))
    assert result.returncode != 0 and "decoder.layers.0.mlp.mystery.weight" in result.stderr
    assert not (tmp_path / "mc").exists()


def test_contradicting_hidden_size_names_both_values(tmp_path):
    result = convert_cli("--loader", "core_mf", "--saver", "core_ext", "--load-dir", str(FIXTURES / "qwen3_interleaved"),
                         "--save-dir", str(tmp_path / "mc"), "--hidden-size", "4096")
    assert result.returncode != 0
    assert "--hidden-size 4096 contradicts the checkpoint, which has 64" in result.stderr


def test_distributed_checkpoint_is_refused_with_merge_hint(tmp_path):
    (tmp_path / "src" / "rank_0").mkdir(parents=True)
    shutil.copy(FIXTURES / "qwen3_interleaved" / "ms.safetensors", tmp_path / "src" / "rank_0")
    result = convert_cli("--loader", "core_mf", "--saver", "core_ext", "--load-dir", str(tmp_path / "src"),
                         "--save-dir", str(tmp_path / "mc"))
    assert result.returncode != 0 and "merge the distributed checkpoint" in result.stderr


def test_intermediate_checkpoint_only_when_asked(tmp_path):
    convert_inprocess("core_mf", "hf", FIXTURES / "qwen3_interleaved", tmp_path / "hf")
    assert not any(tmp_path.glob("**/ms2pt_checkpoint.pt"))
    convert_inprocess("core_mf", "hf", FIXTURES / "qwen3_interleaved", tmp_path / "hf2", "--ms2torch-ckpt-path", str(tmp_path / "ms2pt"))
    assert (tmp_path / "ms2pt" / "ms2pt_checkpoint.pt").exists()


def test_merged_directory_with_param_name_map_and_bf16_input(tmp_path):
    """A merged ("unified") directory: part files + param_name_map.json (+ hyper_param.safetensors); bf16 weights."""
    import json

    tensors = load_file(FIXTURES / "qwen3_interleaved" / "ms.safetensors")
    names = sorted(tensors)
    parts = {"part0.safetensors": names[: len(names) // 2], "part1.safetensors": names[len(names) // 2:]}
    src = tmp_path / "unified"
    src.mkdir()
    for part, keys in parts.items():
        save_file({k: tensors[k].to(torch.bfloat16) for k in keys}, src / part, metadata={"format": "ms"})
    save_file({"epoch_num": torch.tensor([1])}, src / "hyper_param.safetensors", metadata={"format": "ms"})
    (src / "param_name_map.json").write_text(json.dumps({k: part for part, keys in parts.items() for k in keys}))
    convert_inprocess("core_mf", "hf", src, tmp_path / "hf")
    got, want = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(FIXTURES / "hf_qwen3")
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in want.items())


def test_verify_against_the_mindspore_source(tmp_path):
    import subprocess
    import sys

    from util import ROOT

    convert_inprocess("core_mf", "core_ext", FIXTURES / "qwen3_contiguous", tmp_path / "mc", "--qkv-layout", "contiguous",
                      "--fc1-layout", "contiguous", "--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local")
    result = subprocess.run([sys.executable, str(ROOT / "verify.py"), "--source", str(FIXTURES / "qwen3_contiguous"),
                             "--converted", str(tmp_path / "mc"), "--source-args", "--qkv-layout contiguous --fc1-layout contiguous"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
