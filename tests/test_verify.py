"""verify.py: passes on correct conversions, catches one flipped element and a q/k/v mapping error."""

from __future__ import annotations

import subprocess
import sys

import torch

from util import ROOT, convert_inprocess, make_deepseek_model, make_hf_model


def run_verify(*argv):
    return subprocess.run([sys.executable, str(ROOT / "verify.py"), *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_verify_passes_then_catches_a_flipped_element(tmp_path):
    make_hf_model("qwen2", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-tensor-parallel-size", "2",
                      "--target-pipeline-parallel-size", "2", "--saver-transformer-impl", "local")
    ok = run_verify("--source", tmp_path / "hf", "--converted", tmp_path / "mc")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout
    f = next((tmp_path / "mc").glob("*/mp_rank_01_001/model_optim_rng.pt"))
    ckpt = torch.load(f, weights_only=False)
    ckpt["model"]["decoder.layers.1.mlp.linear_fc2.weight"][3, 5] += 1e-3
    torch.save(ckpt, f)
    bad = run_verify("--source", tmp_path / "hf", "--converted", tmp_path / "mc")
    assert bad.returncode == 1
    assert "FAIL transformer layer 3 / mlp l1 weight" in bad.stdout


def test_verify_catches_plain_qkv_concatenation(tmp_path):
    """A converter that concatenates [Q;K;V] instead of interleaving per group must be caught."""
    make_hf_model("llama", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--saver-transformer-impl", "local")
    f = next((tmp_path / "mc").glob("*/mp_rank_00/model_optim_rng.pt"))
    ckpt = torch.load(f, weights_only=False)
    from safetensors.torch import load_file
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    p = "model.layers.0.self_attn."
    ckpt["model"]["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.cat([hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"]])
    torch.save(ckpt, f)
    bad = run_verify("--source", tmp_path / "hf", "--converted", tmp_path / "mc")
    assert bad.returncode == 1 and "FAIL transformer layer 0 / qkv weight" in bad.stdout


def test_verify_deepseek_with_mtp(tmp_path):
    make_deepseek_model(tmp_path / "hf")
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "hf", tmp_path / "mc", "--mtp-num-layers", "1", "--naming", "mindspeed",
                      "--moe-grouped-gemm", "--target-expert-parallel-size", "2", "--target-tensor-parallel-size", "2")
    ok = run_verify("--source", tmp_path / "hf", "--converted", tmp_path / "mc", "--source-args", "--mtp-num-layers 1")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_convert_with_verify_flag_and_manifest(tmp_path):
    from util import convert_cli

    make_hf_model("llama", tmp_path / "hf")
    result = convert_cli("--loader", "hf", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"), "--save-dir",
                         str(tmp_path / "mc"), "--target-tensor-parallel-size", "2", "--params-dtype", "bf16",
                         "--saver-transformer-impl", "local", "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "agrees with every file" in result.stdout
    f = next((tmp_path / "mc").glob("*/mp_rank_01/model_optim_rng.pt"))
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")  # corrupt bytes at the end of one file
    bad = run_verify("--source", tmp_path / "hf", "--converted", tmp_path / "mc")
    assert bad.returncode != 0 and "checksum differs" in bad.stdout


def test_verify_logits(tmp_path):
    make_hf_model("qwen3", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--target-tensor-parallel-size", "2",
                      "--saver-transformer-impl", "local")
    ok = run_verify("--source", tmp_path / "hf", "--converted", tmp_path / "mc", "--logits")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS logits" in ok.stdout and "top-1 agreement 100.0%" in ok.stdout
    for f in (tmp_path / "mc").glob("*/mp_rank_*/model_optim_rng.pt"):  # swap q/k norms: weights still "present"
        ckpt = torch.load(f, weights_only=False)
        sd = ckpt["model"]
        q, k = "decoder.layers.0.self_attention.q_layernorm.weight", "decoder.layers.0.self_attention.k_layernorm.weight"
        sd[q], sd[k] = sd[k], sd[q]
        torch.save(ckpt, f)
    bad = run_verify("--source", tmp_path / "hf", "--converted", tmp_path / "mc", "--logits")
    assert bad.returncode == 1 and "FAIL logits" in bad.stdout
