"""HF Qwen3-MoE (loader `hf`): both router variants (norm_topk_prob true / false), both on-disk expert
layouts, first-k dense layers; logits of megatron-core 0.16 on CPU against transformers, and bit-exact
round trips."""

from __future__ import annotations

import pytest
import torch

from mcore_harness import mcore_logits, read_args
from util import (
    assert_same_conversion,
    assert_same_tensors,
    convert_inprocess,
    fuse_experts,
    hf_logits,
    read_mcore_dir,
    read_safetensors_dir,
)

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
CONFIG = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
              head_dim=24, num_hidden_layers=4, vocab_size=100, max_position_embeddings=128, rms_norm_eps=1e-6,
              num_experts=8, num_experts_per_tok=2)
LAYOUTS = {
    "tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "pp2ep2": ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
}


def make_qwen3_moe(directory, seed=0, **overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**CONFIG, **overrides})).eval()
    with torch.no_grad():  # random norms and a router spread enough that the top-k weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model



MODELS: dict[bool, tuple] = {}


def tiny(tmp_path_factory, norm_topk_prob):
    """One tiny model per router variant for the module (built once)."""
    if norm_topk_prob not in MODELS:
        path = tmp_path_factory.mktemp("q3moe") / "hf"
        MODELS[norm_topk_prob] = make_qwen3_moe(path, norm_topk_prob=norm_topk_prob), path
    return MODELS[norm_topk_prob]


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def hf(request, tmp_path_factory):
    return tiny(tmp_path_factory, request.param)


def diff(ckpt, model):
    return (mcore_logits(ckpt, TOKENS)[..., :100] - hf_logits(model, TOKENS)).abs().max().item()


@pytest.mark.parametrize("norm_topk_prob,layout", [(True, "tp2ep2"), (False, "pp2ep2")])
def test_logits_match_transformers_and_round_trip(tmp_path, tmp_path_factory, norm_topk_prob, layout):
    """Each router variant at one layout (both layouts pass with both variants; kept lean)."""
    model, path = tiny(tmp_path_factory, norm_topk_prob)
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", "--saver-transformer-impl", "local", *LAYOUTS[layout])
    args, _ = read_args(tmp_path / "mc")
    assert args.moe_router_score_function == "softmax" and args.moe_router_topk == 2 and args.moe_ffn_hidden_size == 32
    assert args.moe_router_pre_softmax is (not model.config.norm_topk_prob) and not args.moe_router_enable_expert_bias
    assert args.moe_shared_expert_intermediate_size is None and args.moe_router_topk_scaling_factor is None
    names = {k for sd in read_mcore_dir(tmp_path / "mc").values() for k in sd}
    assert not any("shared_experts" in k or "expert_bias" in k for k in names)
    d = diff(tmp_path / "mc", model)
    print(f"Qwen3-MoE norm_topk_prob={model.config.norm_topk_prob} {layout}: logits max abs diff {d:.2e}")
    assert d < 1e-4
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))


def test_flipped_router_fails_parity(tmp_path, hf):
    """Negative control: the other router variant in the checkpoint's args gives other logits."""
    model, path = hf
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", "--saver-transformer-impl", "local")
    for f in (tmp_path / "mc").glob("*/mp_rank_*/model_optim_rng.pt"):
        ckpt = torch.load(f, weights_only=False)
        ckpt["args"].moe_router_pre_softmax = not ckpt["args"].moe_router_pre_softmax
        torch.save(ckpt, f)
    assert diff(tmp_path / "mc", model) > 1e-3  # the check is < 1e-4


def test_fused_layout_gives_the_same_checkpoint(tmp_path, hf):
    model, path = hf
    fuse_experts(path, tmp_path / "fused")
    from transformers import AutoModelForCausalLM  # transformers itself reads the fused layout as the same model

    fused_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).eval()
    assert (hf_logits(fused_model, TOKENS) - hf_logits(model, TOKENS)).abs().max() < 1e-5
    flags = ["--saver-transformer-impl", "local", *LAYOUTS["tp2ep2"], "--experts-per-message", "3"]
    assert_same_conversion(path, tmp_path / "fused", tmp_path, *flags)
    convert_inprocess("core_ext", "hf", tmp_path / "b", tmp_path / "back")  # written back per expert, as transformers saves
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))


def test_first_k_dense_layers(tmp_path):
    model = make_qwen3_moe(tmp_path / "hf", seed=1, mlp_only_layers=[0], norm_topk_prob=True)
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", "--saver-transformer-impl", "local",
                      "--target-expert-parallel-size", "2")
    assert read_args(tmp_path / "mc")[0].moe_layer_freq == [0, 1, 1, 1]
    assert diff(tmp_path / "mc", model) < 1e-4
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "back"))


@pytest.mark.parametrize("overrides,message", [
    (dict(mlp_only_layers=[1]), "mlp_only_layers [1] / decoder_sparse_step 1"),
    (dict(decoder_sparse_step=2), "decoder_sparse_step 2 make layers [0, 2] dense"),
    (dict(num_experts_per_tok=1, norm_topk_prob=True), "num_experts_per_tok 1"),
])
def test_inexpressible_configs_are_refused(tmp_path, capsys, overrides, message):
    make_qwen3_moe(tmp_path / "hf", **overrides)
    with pytest.raises(SystemExit):
        convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc")
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mc").exists()
