"""HF GLM-4.5 (glm4_moe, loader `hf`): partial rotary, q/k/v bias, q/k norm, sigmoid group routing with expert
bias and scaling, shared expert, first-k dense, MTP after the last layer. Real megatron-core 0.16.1 models built
from the checkpoint's args on CPU against transformers (main and MTP logits), bit-exact round trips, both
on-disk expert layouts, negative controls and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from mcore_harness import mcore_logits, mcore_outputs, read_args
from test_parity import mtp_reference
from util import assert_same_conversion, assert_same_tensors, convert_inprocess, fuse_experts, hf_logits, read_safetensors_dir

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
# Group routing megatron-core can express (num_experts_per_tok / topk_group = 2), q/k norm, q/k/v bias,
# transformers' default partial_rotary_factor (0.5 of head_dim 24), one MTP layer.
CONFIG = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
              head_dim=24, num_hidden_layers=4, vocab_size=100, max_position_embeddings=128, rms_norm_eps=1e-6,
              n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
              first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, num_nextn_predict_layers=1)
LAYOUTS = {
    "tp1": [],
    "tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "pp2ep2": ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
}
LOCAL = ["--saver-transformer-impl", "local"]


def make_glm(directory, seed=0, mtp=True, **overrides):
    """A tiny random GLM-4.5 saved with transformers (random norms, biases and expert bias, a router spread
    enough that the choice of experts matters), plus, with `mtp`, an MTP layer written into the safetensors
    as GLM-4.5's release does (layer num_hidden_layers: a MoE decoder layer, enorm, hnorm, eh_proj,
    shared_head.norm and copies of embed_tokens / lm_head; transformers neither builds nor saves it).
    Returns (model, MTP tensors)."""
    from safetensors.torch import load_file, save_file
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(Glm4MoeConfig(**{**CONFIG, **overrides})).eval()
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(cfg.n_routed_experts))
    model.save_pretrained(directory)
    mtp_state: dict[str, torch.Tensor] = {}
    if mtp:
        tensors = load_file(directory / "model.safetensors")
        h, n = cfg.hidden_size, cfg.num_hidden_layers
        gen = torch.Generator().manual_seed(seed + 1)
        last = f"model.layers.{n - 1}."
        mtp_state = {name[len(last):]: t + 0.02 * torch.randn(t.shape, generator=gen) for name, t in tensors.items()
                     if name.startswith(last)}
        mtp_state.update({
            "enorm.weight": 1 + 0.1 * torch.randn(h, generator=gen), "hnorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
            "eh_proj.weight": 0.05 * torch.randn(h, 2 * h, generator=gen),
            "shared_head.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
            "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
            "shared_head.head.weight": tensors["lm_head.weight"].clone(),
        })
        tensors.update({f"model.layers.{n}.{k}": v.contiguous() for k, v in mtp_state.items()})
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return model, mtp_state


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm") / "hf"
    return *make_glm(path), path


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def back_to_hf_is_exact(mc, original, out):
    convert_inprocess("core_ext", "hf", mc, out)
    assert_same_tensors(read_safetensors_dir(original), read_safetensors_dir(out))
    assert config_of(out) == config_of(original)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers_and_round_trip(tmp_path, glm, layout):
    """Main and MTP logits of the megatron-core model built from the checkpoint's args (every rank loaded
    strict) against transformers and the MTP reference; then back to HF bit for bit, config.json included."""
    model, mtp, path = glm
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL, *LAYOUTS[layout])
    args, _ = read_args(tmp_path / "mc")
    assert (args.rotary_percent, args.kv_channels, args.add_qkv_bias, args.qk_layernorm) == (0.5, 24, True, True)
    assert (args.moe_router_score_function, args.moe_router_enable_expert_bias, args.moe_router_topk_scaling_factor) == ("sigmoid", True, 2.5)
    assert (args.moe_router_num_groups, args.moe_router_group_topk, args.moe_router_topk) == (4, 2, 4)
    assert args.moe_shared_expert_intermediate_size == 32 and args.moe_layer_freq == [0, 1, 1, 1] and args.mtp_num_layers == 1
    assert args.hf_model_type == "glm4_moe"
    out = mcore_outputs(tmp_path / "mc", TOKENS)
    main_diff = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    mtp_diff = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    print(f"GLM-4.5 {layout}: logits max abs diff {main_diff:.2e}, MTP logits {mtp_diff:.2e}")
    assert main_diff < 1e-4 and mtp_diff < 1e-4
    back_to_hf_is_exact(tmp_path / "mc", path, tmp_path / "back")


@pytest.mark.parametrize("rotary", [None, 0.25], ids=["default_rotary", "top_level_rotary"])
def test_release_config_without_mtp_tensors(tmp_path, rotary):
    """config.json as GLM-4.5-Air's release writes it (RoPE settings at top level, no group limit, no q/k norm),
    with partial_rotary_factor absent (transformers' default 0.5 applies) or at top level; its MTP layer named
    in config.json but absent, as in any checkpoint transformers saved: converted without MTP, and config.json
    comes back unchanged."""
    path = tmp_path / "hf"
    make_glm(path, seed=2, mtp=False, n_group=1, topk_group=1, use_qk_norm=False, partial_rotary_factor=rotary or 0.5)
    cfg = config_of(path)
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    if rotary is not None:
        cfg["partial_rotary_factor"] = rotary
    (path / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.rope_parameters["partial_rotary_factor"] == (rotary or 0.5)
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL)
    args, _ = read_args(tmp_path / "mc")
    assert args.rotary_percent == (rotary or 0.5) and args.moe_router_num_groups is None and not args.qk_layernorm
    assert not args.mtp_num_layers
    diff = (mcore_logits(tmp_path / "mc", TOKENS)[..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    print(f"GLM-4.5-Air-style config, partial rotary {rotary or 0.5}: logits max abs diff {diff:.2e}")
    assert diff < 1e-4
    back_to_hf_is_exact(tmp_path / "mc", path, tmp_path / "back")


def edit_args(directory, **fields):
    """Change the checkpoint's args in every rank file (and drop the tensors a field removes)."""
    for f in directory.glob("*/mp_rank_*/model_optim_rng.pt"):
        ckpt = torch.load(f, weights_only=False)
        for name, value in fields.items():
            if value is None:
                delattr(ckpt["args"], name)
            else:
                setattr(ckpt["args"], name, value)
        if fields.get("moe_router_enable_expert_bias") is False:
            ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.endswith("router.expert_bias")}
        torch.save(ckpt, f)


@pytest.mark.parametrize("dropped", [dict(rotary_percent=1.0), dict(moe_router_enable_expert_bias=False)],
                         ids=["full_rotary", "no_expert_bias"])
def test_negative_controls_fail_parity(tmp_path, glm, dropped):
    """Partial rotary or the expert bias dropped from the checkpoint's args: the logits no longer match (the
    same conversion matches at TP1 in test_logits_match_transformers_and_round_trip)."""
    model, _, path = glm
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL, "--mtp-num-layers", "0")
    edit_args(tmp_path / "mc", **dropped)
    assert (mcore_logits(tmp_path / "mc", TOKENS)[..., :100] - hf_logits(model, TOKENS)).abs().max() > 1e-3



def test_fused_layout_gives_the_same_checkpoint(tmp_path, glm):
    model, _, path = glm
    fuse_experts(path, tmp_path / "fused")
    flags = [*LOCAL, *LAYOUTS["tp2ep2"], "--experts-per-message", "3"]
    assert_same_conversion(path, tmp_path / "fused", tmp_path, *flags)
    back_to_hf_is_exact(tmp_path / "b", path, tmp_path / "back")  # written back per expert, as transformers saves


@pytest.mark.parametrize("flags", [
    ["--moe-grouped-gemm", *LAYOUTS["tp2ep2"]],
    ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", *LOCAL],
    ["--naming", "mindspeed", "--moe-grouped-gemm", *LAYOUTS["tp2ep2"]],
    ["--ckpt-format", "torch_dist"],
], ids=["te_grouped", "vpp", "mindspeed", "torch_dist"])
def test_other_layouts_round_trip(tmp_path, glm, flags):
    _, _, path = glm
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *flags)
    back_to_hf_is_exact(tmp_path / "mc", path, tmp_path / "back")


@pytest.mark.parametrize("forget", [("hf_config",), ("hf_config", "hf_model_type")], ids=["family_recorded", "family_inferred"])
def test_config_rebuilt_from_args(tmp_path, glm, forget):
    """Without the source config.json in args (nor --hf-config-dir) the glm4_moe config.json is rebuilt from the
    args (the family recorded, else recognised by its sigmoid routing with expert bias): transformers builds
    the same model from it."""
    model, _, path = glm
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL)
    edit_args(tmp_path / "mc", **dict.fromkeys(forget))
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))
    cfg = config_of(tmp_path / "back")
    assert cfg["model_type"] == "glm4_moe" and cfg["rope_parameters"]["partial_rotary_factor"] == 0.5
    from transformers import AutoConfig, AutoModelForCausalLM

    rebuilt, source = AutoConfig.from_pretrained(tmp_path / "back").to_dict(), AutoConfig.from_pretrained(path).to_dict()
    assert {k: v for k, v in rebuilt.items() if v != source.get(k) and k != "_name_or_path"} == {}, "fields the rebuilt config gets wrong"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert torch.equal(hf_logits(back, TOKENS), hf_logits(model, TOKENS))


@pytest.mark.parametrize("overrides,flags,message", [
    (dict(norm_topk_prob=False), [], "norm_topk_prob false with num_experts_per_tok 4"),
    (dict(num_experts_per_tok=1, topk_group=4), [], "norm_topk_prob true with num_experts_per_tok 1"),
    (dict(topk_group=1), [], "n_group 4 / topk_group 1 with num_experts_per_tok 4"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=2.0)), [], "rope_type 'yarn'"),
    (dict(n_shared_experts=0), [], "n_shared_experts 0"),
    ({}, ["--mtp-num-layers", "2"], "--mtp-num-layers 2: the checkpoint holds 1 MTP layers"),
    (dict(tie_word_embeddings=True), [], "tie_word_embeddings true with MTP layers"),
], ids=["sigmoid_not_renormalised", "top1_renormalised", "group_ranking", "yarn", "no_shared_expert", "missing_mtp", "tied_mtp"])
def test_inexpressible_configs_are_refused(tmp_path, capsys, glm, overrides, flags, message):
    """One error line naming the field, nothing written."""
    _, _, path = glm
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").symlink_to(path / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config_of(path), **overrides}))
    with pytest.raises(SystemExit):
        convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc", *flags)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mc").exists()


def test_reshard_keeps_partial_rotary_and_family(tmp_path, glm):
    """mcore -> mcore carries rotary_percent and the HF family in args (then back to HF bit for bit)."""
    _, _, path = glm
    convert_inprocess("hf", "core_ext", path, tmp_path / "a", *LOCAL, *LAYOUTS["tp2ep2"])
    convert_inprocess("core_ext", "core_ext", tmp_path / "a", tmp_path / "b", *LAYOUTS["pp2ep2"])
    args, _ = read_args(tmp_path / "b")
    assert (args.rotary_percent, args.hf_model_type, args.pipeline_model_parallel_size) == (0.5, "glm4_moe", 2)
    back_to_hf_is_exact(tmp_path / "b", path, tmp_path / "back")


def test_partial_rotary_refused_for_other_families(tmp_path, capsys):
    """A dense checkpoint whose args say rotary_percent 0.5 has no HF config to say so: refused, not dropped."""
    from util import make_hf_model

    make_hf_model("llama", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "mc")
    edit_args(tmp_path / "mc", rotary_percent=0.5)
    with pytest.raises(SystemExit):
        convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert "rotary_percent 0.5 (partial rotary) has no place" in capsys.readouterr().err


def test_disagreeing_output_config_is_refused(tmp_path, capsys, glm):
    """--hf-config-dir whose partial_rotary_factor is not the checkpoint's rotary_percent."""
    _, _, path = glm
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", *LOCAL)
    (tmp_path / "cfg").mkdir()
    cfg = config_of(path)
    cfg["rope_parameters"]["partial_rotary_factor"] = 1.0
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back", "--hf-config-dir", str(tmp_path / "cfg"))
    assert "config.json partial_rotary_factor=1.0 disagrees with the checkpoint's rotary_percent=0.5" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()
