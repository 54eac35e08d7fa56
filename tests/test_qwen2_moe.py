"""HF Qwen2-MoE (loader `hf`, saver `hf`): qkv bias, a shared expert behind a sigmoid gate, a dense first layer,
both routers (norm_topk_prob false / true); megatron-core 0.16 on CPU, built from the checkpoint's args, against
transformers; bit-exact round trips; both on-disk expert layouts; configs megatron-core cannot express refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mcore_harness import mcore_logits, read_args
from util import (
    MOE_ROUND_TRIPS,
    assert_same_conversion,
    assert_same_tensors,
    convert_inprocess,
    fuse_experts,
    hf_logits,
    read_mcore_dir,
    read_safetensors_dir,
)

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
CONFIG = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, vocab_size=100, max_position_embeddings=128,
              rms_norm_eps=1e-6, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0])
LAYOUTS = {
    "tp1": [],
    "tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "pp2ep2": ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "pp2vpp2ep2": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                   "--target-expert-parallel-size", "2"],
}
LOCAL = ("--saver-transformer-impl", "local")


def make_qwen2_moe(directory, seed=0, **overrides):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**CONFIG, **overrides})).eval()
    with torch.no_grad():  # random norms and biases (transformers zeroes them), a spread router, gates far from 0.5
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


MODELS: dict[bool, tuple] = {}


def tiny(tmp_path_factory, norm_topk_prob=False):
    """One tiny model per router variant for the module (built once)."""
    if norm_topk_prob not in MODELS:
        path = tmp_path_factory.mktemp("q2moe") / "hf"
        MODELS[norm_topk_prob] = make_qwen2_moe(path, norm_topk_prob=norm_topk_prob), path
    return MODELS[norm_topk_prob]


def diff(ckpt, model):
    return (mcore_logits(ckpt, TOKENS)[..., :100] - hf_logits(model, TOKENS)).abs().max().item()


def rewrite_args(ckpt, edit):
    """Apply `edit(ckpt_dict)` to every rank file of a legacy checkpoint."""
    for f in ckpt.glob("*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        edit(state)
        torch.save(state, f)


@pytest.mark.parametrize("norm_topk_prob,layout", [(False, "tp1"), (False, "tp2ep2"), (False, "pp2ep2"), (True, "pp2vpp2ep2")])
def test_logits_match_transformers_and_round_trip(tmp_path, tmp_path_factory, norm_topk_prob, layout):
    model, path = tiny(tmp_path_factory, norm_topk_prob)
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL, *LAYOUTS[layout])
    args, _ = read_args(tmp_path / "mc")
    assert args.moe_shared_expert_gate is True and args.moe_shared_expert_intermediate_size == 48 and args.add_qkv_bias
    assert args.moe_router_score_function == "softmax" and args.moe_router_pre_softmax is (not norm_topk_prob)
    assert args.moe_layer_freq == [0, 1, 1, 1] and args.moe_ffn_hidden_size == 32 and args.moe_router_topk == 2
    assert not args.moe_router_enable_expert_bias and not args.qk_layernorm and args.hf_model_type == "qwen2_moe"
    names = {k for sd in read_mcore_dir(tmp_path / "mc").values() for k in sd}
    assert any(k.endswith("mlp.shared_experts.gate_weight") for k in names) and not any("expert_bias" in k for k in names)
    d = diff(tmp_path / "mc", model)
    print(f"Qwen2-MoE norm_topk_prob={norm_topk_prob} {layout}: logits max abs diff {d:.2e}")
    assert d < 1e-4
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((path / "config.json").read_text())


def test_dropped_shared_expert_gate_fails_parity_and_is_no_hf_family(tmp_path, tmp_path_factory):
    """Negative control: without the sigmoid gate (args and tensor), megatron-core's logits are other ones; such a
    checkpoint (shared expert, no gate) is none of the HF families and is refused on the way out."""
    model, path = tiny(tmp_path_factory)
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL)

    def drop_gate(state):
        state["args"].moe_shared_expert_gate = False
        for k in [k for k in state["model"] if k.endswith("shared_experts.gate_weight")]:
            del state["model"][k]

    rewrite_args(tmp_path / "mc", drop_gate)
    assert diff(tmp_path / "mc", model) > 1e-3  # the check is < 1e-4
    with pytest.raises(SystemExit):
        convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("layout", sorted(MOE_ROUND_TRIPS))
def test_more_layouts_round_trip_bit_exact(tmp_path, tmp_path_factory, layout):
    """TE names, grouped experts, torch_dist and uneven pipeline stages: HF -> mcore -> HF gives the original."""
    _, path = tiny(tmp_path_factory)
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *MOE_ROUND_TRIPS[layout])
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))



def test_fused_layout_and_release_config_give_the_same_checkpoint(tmp_path, tmp_path_factory):
    """The fused expert layout, and a release config.json (no `qkv_bias` field: transformers' default, true),
    convert to the same rank files as transformers 5's own per-expert save."""
    from transformers import AutoModelForCausalLM

    model, path = tiny(tmp_path_factory)
    fuse_experts(path, tmp_path / "fused")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["qkv_bias"]
    (tmp_path / "fused" / "config.json").write_text(json.dumps(cfg))
    fused_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).eval()
    assert (hf_logits(fused_model, TOKENS) - hf_logits(model, TOKENS)).abs().max() < 1e-5  # transformers reads it so too
    flags = [*LOCAL, *LAYOUTS["tp2ep2"], "--experts-per-message", "3"]
    assert_same_conversion(path, tmp_path / "fused", tmp_path, *flags)
    convert_inprocess("core_ext", "hf", tmp_path / "b", tmp_path / "back")  # written back per expert, as transformers saves
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))


def test_config_rebuilt_from_the_checkpoint_flags(tmp_path, tmp_path_factory):
    """A checkpoint that recorded neither the HF config nor the family (args as Megatron-LM's training writes them)
    goes back to a Qwen2-MoE config.json built from its flags, which transformers runs as the original model."""
    from transformers import AutoModelForCausalLM

    model, path = tiny(tmp_path_factory)
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL)

    def forget_config(state):
        del state["args"].hf_config, state["args"].hf_model_type

    rewrite_args(tmp_path / "mc", forget_config)
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["mlp_only_layers"] == [0] and cfg["norm_topk_prob"] is False
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert (hf_logits(back, TOKENS) - hf_logits(model, TOKENS)).abs().max() < 1e-5


@pytest.mark.parametrize("overrides,message", [
    (dict(use_sliding_window=True), "use_sliding_window true"),
    (dict(num_experts_per_tok=1, norm_topk_prob=True), "num_experts_per_tok 1 with norm_topk_prob true"),
    (dict(mlp_only_layers=[2]), "mlp_only_layers [2] / decoder_sparse_step 1"),
])
def test_inexpressible_configs_are_refused(tmp_path, tmp_path_factory, capsys, overrides, message):
    _, path = tiny(tmp_path_factory)
    shutil.copytree(path, tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **overrides}))
    with pytest.raises(SystemExit):
        convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc")
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mc").exists()
