"""HF Mixtral (loader `hf`, saver `hf`): GQA, renormalised softmax top-2, `block_sparse_moe` w1/w3/w2 as
transformers 5 saves them; megatron-core 0.16 on CPU, built from the checkpoint's args, against transformers;
bit-exact round trips; the fused and in-memory on-disk layouts; configs megatron-core cannot express refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mcore_harness import mcore_logits, read_args
from util import MOE_ROUND_TRIPS, assert_same_conversion, assert_same_tensors, convert_inprocess, hf_logits, read_safetensors_dir

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
CONFIG = dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
              vocab_size=100, max_position_embeddings=128, rms_norm_eps=1e-6, num_local_experts=8, num_experts_per_tok=2)
LAYOUTS = {
    "tp1": [],
    "tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "pp2ep2": ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
}
LOCAL = ("--saver-transformer-impl", "local")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """One tiny Mixtral for the module, saved by transformers (random norms, a router spread enough to matter)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    model.save_pretrained(path)
    return model, path


def diff(ckpt, model):
    return (mcore_logits(ckpt, TOKENS)[..., :100] - hf_logits(model, TOKENS)).abs().max().item()


def save_as_hf(tensors, cfg, dst):
    from safetensors.torch import save_file

    dst.mkdir()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_match_transformers_and_round_trip(tmp_path, hf, layout):
    model, path = hf
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in read_safetensors_dir(path))  # transformers 5.23's names
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL, *LAYOUTS[layout])
    args, _ = read_args(tmp_path / "mc")
    assert args.moe_router_score_function == "softmax" and args.moe_router_pre_softmax is False and args.moe_router_topk == 2
    assert args.moe_layer_freq == [1, 1, 1, 1] and args.moe_ffn_hidden_size == 32 and args.num_query_groups == 2
    assert args.moe_shared_expert_intermediate_size is None and not getattr(args, "moe_shared_expert_gate", False)
    assert not args.add_qkv_bias and not args.qk_layernorm and not args.moe_router_enable_expert_bias
    assert args.hf_model_type == "mixtral"
    d = diff(tmp_path / "mc", model)
    print(f"Mixtral {layout}: logits max abs diff {d:.2e}")
    assert d < 1e-4
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((path / "config.json").read_text())


def test_swapped_gate_and_up_fail_parity(tmp_path, hf):
    """Negative control: w1 (gate) and w3 (up) exchanged on disk convert, and give other logits."""
    model, path = hf
    swap = {".w1.": ".w3.", ".w3.": ".w1."}
    tensors = {next((n.replace(a, b) for a, b in swap.items() if a in n), n): t for n, t in read_safetensors_dir(path).items()}
    save_as_hf(tensors, json.loads((path / "config.json").read_text()), tmp_path / "swapped")
    convert_inprocess("hf", "core_ext", tmp_path / "swapped", tmp_path / "mc", *LOCAL)
    assert diff(tmp_path / "mc", model) > 1e-3  # the check is < 1e-4


@pytest.mark.parametrize("prefix", ["mlp.", "block_sparse_moe."])
def test_fused_and_in_memory_layouts_give_the_same_checkpoint(tmp_path, hf, prefix):
    """Experts fused ([E, 2I, H] with w1 rows first, [E, H, I]) under transformers' in-memory prefix `mlp.` or the
    release's, and the expert count as `num_experts`: the same rank files as the release layout."""
    from transformers import AutoModelForCausalLM

    model, path = hf
    tensors, cfg = read_safetensors_dir(path), json.loads((path / "config.json").read_text())
    out = {k: v for k, v in tensors.items() if ".block_sparse_moe." not in k}
    for layer in range(cfg["num_hidden_layers"]):
        p, e = f"model.layers.{layer}.block_sparse_moe.", range(cfg["num_local_experts"])
        q = f"model.layers.{layer}.{prefix}"
        out[q + "gate.weight"] = tensors[p + "gate.weight"]
        out[q + "experts.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}experts.{i}.w1.weight"],
                                                                  tensors[f"{p}experts.{i}.w3.weight"]]) for i in e])
        out[q + "experts.down_proj"] = torch.stack([tensors[f"{p}experts.{i}.w2.weight"] for i in e])
    cfg["num_experts"] = cfg.pop("num_local_experts")
    save_as_hf(out, cfg, tmp_path / "fused")
    fused_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).eval()
    assert (hf_logits(fused_model, TOKENS) - hf_logits(model, TOKENS)).abs().max() < 1e-5  # transformers reads it so too
    flags = [*LOCAL, *LAYOUTS["tp2ep2"], "--experts-per-message", "3"]
    assert_same_conversion(path, tmp_path / "fused", tmp_path, *flags)
    convert_inprocess("core_ext", "hf", tmp_path / "b", tmp_path / "back")  # written back in the release layout
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))


@pytest.mark.parametrize("layout", sorted(MOE_ROUND_TRIPS))
def test_more_layouts_round_trip_bit_exact(tmp_path, hf, layout):
    """TE names, grouped experts, torch_dist and uneven pipeline stages: HF -> mcore -> HF gives the original."""
    _, path = hf
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *MOE_ROUND_TRIPS[layout])
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))


def test_config_rebuilt_from_the_checkpoint_flags(tmp_path, hf):
    """A checkpoint that recorded neither the HF config nor the family goes back to a Mixtral config.json built from
    its flags (no shared expert, no q/k norm, no qkv bias, renormalised top-k), which transformers runs as the
    original model."""
    from transformers import AutoModelForCausalLM

    model, path = hf
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL)
    for f in (tmp_path / "mc").glob("*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        del state["args"].hf_config, state["args"].hf_model_type
        torch.save(state, f)
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8 and cfg["intermediate_size"] == 32
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert (hf_logits(back, TOKENS) - hf_logits(model, TOKENS)).abs().max() < 1e-5


@pytest.mark.parametrize("overrides,message", [
    (dict(sliding_window=4096), "config.json: sliding_window 4096 is not supported"),
    (dict(num_experts_per_tok=1), "num_experts_per_tok 1 with Mixtral's renormalised top-k weights"),
])
def test_inexpressible_configs_are_refused(tmp_path, hf, capsys, overrides, message):
    shutil.copytree(hf[1], tmp_path / "hf")
    cfg = json.loads((hf[1] / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **overrides}))
    with pytest.raises(SystemExit):
        convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc")
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mc").exists()
