"""loader_core_mf on real MindSpore Transformers checkpoints (made by mindformers 1.9.0's converters,
see tests/fixtures/make_mindspore_fixtures.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore_harness import mcore_logits
from util import assert_same_tensors, convert_cli, convert_inprocess, read_mcore_dir, read_safetensors_dir

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


def test_distributed_checkpoint_without_strategy_says_what_to_pass(tmp_path):
    """Per-rank files are read with their strategy files (tests/test_mindspore_training.py); without them, say so."""
    (tmp_path / "src" / "rank_0").mkdir(parents=True)
    shutil.copy(FIXTURES / "qwen3_interleaved" / "ms.safetensors", tmp_path / "src" / "rank_0")
    result = convert_cli("--loader", "core_mf", "--saver", "core_ext", "--load-dir", str(tmp_path / "src"),
                         "--save-dir", str(tmp_path / "mc"))
    assert result.returncode != 0 and "pass --strategy-path" in result.stderr


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


# MoE checkpoints: DeepSeek-V3 (MLA, grouped experts, shared expert, expert bias, first layer dense, MTP) and Qwen3-MoE.
DEEPSEEK_FLAGS = ["--params-dtype", "fp32", "--model-config", str(FIXTURES / "hf_deepseek3")]
TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


def test_deepseek3_to_hf_reproduces_the_original_with_mtp(tmp_path):
    convert_inprocess("core_mf", "hf", FIXTURES / "deepseek3", tmp_path / "hf", *DEEPSEEK_FLAGS)
    assert_same_tensors(read_safetensors_dir(FIXTURES / "hf_deepseek3"), read_safetensors_dir(tmp_path / "hf"))


def test_deepseek3_tp2ep2_logits_and_mtp_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from mcore_harness import mcore_outputs
    from test_parity import mtp_reference

    convert_inprocess("core_mf", "core_ext", FIXTURES / "deepseek3", tmp_path / "mc", *DEEPSEEK_FLAGS, "--saver-transformer-impl", "local",
                      "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2")
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "hf_deepseek3", dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    mtp = {k.removeprefix(f"model.layers.{layers}."): v for k, v in read_safetensors_dir(FIXTURES / "hf_deepseek3").items()
           if k.startswith(f"model.layers.{layers}.")}
    out = mcore_outputs(tmp_path / "mc", TOKENS)
    with torch.no_grad():
        diff = (out["logits"][..., :100] - model(TOKENS).logits).abs().max().item()
    mtp_diff = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    print(f"MindSpore DeepSeek-V3 TP2xEP2: logits max abs diff {diff:.2e}, MTP {mtp_diff:.2e}")
    assert diff < 1e-4 and mtp_diff < 1e-4


def _untransposed_experts(tmp_path):
    """Negative control: weight1/weight2 stacked as [E, 2F, H] / [E, H, F] without the transpose mindformers
    applies; with H == 2F (64 == 2 * 32) the shapes are the same, so only the values can tell."""
    tensors = load_file(FIXTURES / "deepseek3" / "ms.safetensors")
    for name, t in tensors.items():
        if name.endswith(("experts.weight1", "experts.weight2")):
            rows = 64 if name.endswith("weight1") else 32
            tensors[name] = t.reshape(8, rows, -1).transpose(1, 2).reshape(t.shape).contiguous()
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "ms.safetensors", metadata={"format": "ms"})
    return tmp_path / "bad"


def test_wrong_expert_layout_fails_the_logits_check(tmp_path):
    from transformers import AutoModelForCausalLM

    convert_inprocess("core_mf", "hf", _untransposed_experts(tmp_path), tmp_path / "hf", *DEEPSEEK_FLAGS)
    got, want = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(FIXTURES / "hf_deepseek3")
    assert not torch.equal(got["model.layers.1.mlp.experts.0.gate_proj.weight"], want["model.layers.1.mlp.experts.0.gate_proj.weight"])
    with torch.no_grad():
        wrong = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()(TOKENS).logits
        right = AutoModelForCausalLM.from_pretrained(FIXTURES / "hf_deepseek3", dtype=torch.float32).eval()(TOKENS).logits
    assert (wrong - right).abs().max().item() > 1e-3


def test_deepseek3_mtp_can_be_skipped_and_is_reported(tmp_path):
    result = convert_cli("--loader", "core_mf", "--saver", "hf", "--load-dir", str(FIXTURES / "deepseek3"),
                         "--save-dir", str(tmp_path / "hf"), *DEEPSEEK_FLAGS, "--mtp-num-layers", "0")
    assert result.returncode == 0, result.stderr
    assert "skipping the 18 MTP tensors" in result.stdout
    got = read_safetensors_dir(tmp_path / "hf")
    assert not any(k.startswith("model.layers.3.") for k in got) and "model.layers.2.mlp.experts.7.down_proj.weight" in got


def test_moe_checkpoint_without_model_config_says_what_to_pass(tmp_path):
    result = convert_cli("--loader", "core_mf", "--saver", "hf", "--load-dir", str(FIXTURES / "deepseek3"), "--save-dir", str(tmp_path / "hf"))
    assert result.returncode != 0 and "pass --model-config" in result.stderr


def test_model_config_contradicting_the_tensors_names_both(tmp_path):
    import json

    cfg = json.loads((FIXTURES / "hf_deepseek3" / "config.json").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**cfg, "n_routed_experts": 16}))
    result = convert_cli("--loader", "core_mf", "--saver", "hf", "--load-dir", str(FIXTURES / "deepseek3"), "--save-dir",
                         str(tmp_path / "hf"), "--model-config", str(tmp_path / "cfg"))
    assert result.returncode != 0 and "routed experts 16 contradicts the checkpoint, which has 8" in result.stderr


def test_qwen3_moe_messages_match_the_hf_model():
    """Qwen3-MoE (GQA + q/k norm, 8 grouped experts, no shared expert, no expert bias): every protocol
    message equals the HF tensors."""
    import argparse

    from ckpt_lib.engine import ms_loader
    from ckpt_lib.families import QKV
    from ckpt_lib.transport import protocol as P

    class Collect(list):
        def put(self, item):
            self.append(item)

    parser = argparse.ArgumentParser()
    parser.add_argument("--load-dir")
    ms_loader.add_arguments(parser)
    messages = Collect()
    ms_loader.load(messages, parser.parse_args(["--load-dir", str(FIXTURES / "qwen3_moe"), "--params-dtype", "fp32",
                                                "--model-config", str(FIXTURES / "hf_qwen3_moe"), "--experts-per-message", "3"]))
    md, hf = messages[0], read_safetensors_dir(FIXTURES / "hf_qwen3_moe")
    assert (md.num_experts, md.moe_ffn_hidden_size, md.moe_shared_expert_intermediate_size, md.moe_router_enable_expert_bias) == (8, 16, None, False)
    by_name: dict = {}
    for msg in messages[1:-1]:
        by_name.setdefault(msg.pop("name"), []).append(msg)
    assert torch.equal(by_name["embeddings"][0][P.WORD_EMB], hf["model.embed_tokens.weight"])
    assert torch.equal(by_name["output layer"][0]["weight"], hf["lm_head.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        layer = by_name[P.layer_message(i)][0]
        assert sorted(layer) == sorted(P.layer_shapes(md, i))
        qkv = QKV.forward(tuple(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), md)[0]
        assert torch.equal(layer[P.QKV_W], qkv) and torch.equal(layer[P.ROUTER_W], hf[p + "mlp.gate.weight"])
        assert torch.equal(layer[P.Q_NORM_W], hf[p + "self_attn.q_norm.weight"])
        experts = by_name[P.experts_message(P.layer_message(i))]
        assert [m.pop(P.FIRST_EXPERT) for m in experts] == [0, 3, 6]
        for key, hf_name in ((P.FC1_GATE_W, "gate_proj"), (P.FC1_UP_W, "up_proj"), (P.FC2_W, "down_proj")):
            stacked = torch.cat([m[key] for m in experts])
            assert torch.equal(stacked, torch.stack([hf[p + f"mlp.experts.{e}.{hf_name}.weight"] for e in range(8)])), key


QWEN3_MOE_FLAGS = ["--params-dtype", "fp32", "--model-config", str(FIXTURES / "hf_qwen3_moe")]


def test_qwen3_moe_to_hf_reproduces_the_original(tmp_path):
    convert_inprocess("core_mf", "hf", FIXTURES / "qwen3_moe", tmp_path / "hf", *QWEN3_MOE_FLAGS)
    assert_same_tensors(read_safetensors_dir(FIXTURES / "hf_qwen3_moe"), read_safetensors_dir(tmp_path / "hf"))


def test_qwen3_moe_tp2ep2_logits_match_transformers_and_round_trip(tmp_path):
    """No shared expert, no router bias, softmax top-k: megatron-core loads it strictly and agrees with
    transformers; read back, it gives the HF original bit for bit."""
    from transformers import AutoModelForCausalLM

    convert_inprocess("core_mf", "core_ext", FIXTURES / "qwen3_moe", tmp_path / "mc", *QWEN3_MOE_FLAGS, "--saver-transformer-impl",
                      "local", "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2")
    names = {k for sd in read_mcore_dir(tmp_path / "mc").values() for k in sd}
    assert not any("shared_experts" in k or "expert_bias" in k for k in names)
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "hf_qwen3_moe", dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (mcore_logits(tmp_path / "mc", TOKENS)[..., :100] - model(TOKENS).logits).abs().max().item()
    print(f"MindSpore Qwen3-MoE TP2xEP2: logits max abs diff {diff:.2e}")
    assert diff < 1e-4
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "hf")
    assert_same_tensors(read_safetensors_dir(FIXTURES / "hf_qwen3_moe"), read_safetensors_dir(tmp_path / "hf"))


@pytest.mark.parametrize("value", [False, None])
def test_qwen3_moe_without_renormalised_top_k_is_refused(tmp_path, value):
    """norm_topk_prob false (also transformers' default when absent) routes differently from megatron-core."""
    import json

    cfg = json.loads((FIXTURES / "hf_qwen3_moe" / "config.json").read_text())
    if value is None:
        del cfg["norm_topk_prob"]
    else:
        cfg["norm_topk_prob"] = value
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    result = convert_cli("--loader", "core_mf", "--saver", "hf", "--load-dir", str(FIXTURES / "qwen3_moe"), "--save-dir",
                         str(tmp_path / "hf"), "--model-config", str(tmp_path / "cfg"))
    assert result.returncode != 0 and "norm_topk_prob false" in result.stderr
    assert not (tmp_path / "hf").exists()
