"""The MLA family beyond DeepSeek-V3: DeepSeek-V2-Lite (softmax router, `q_lora_rank` null), Moonlight (DeepSeek-V3
layout with `q_lora_rank` null: megatron-core's `linear_q_proj`) and Kimi-K2 (`model_type` kimi_k2, one expert group,
one dense layer, YaRN with beta 1/1). Tiny transformers models, HF -> mcore at TP1, TP2xEP2 and PP2xEP2 loaded strict
into megatron-core 0.16.1 models built from the checkpoint's own args (logits, MTP logits too, against transformers),
back to HF bit for bit with the config, a negative control per family, the refusals, and LoRA on `linear_q_proj`.

transformers 5.23 has no kimi_k2 class (its Kimi-K2.5 config maps kimi_k2 to deepseek_v3): the Kimi-K2 reference is
a DeepseekV3ForCausalLM whose config.json says kimi_k2, which is how frameworks run Kimi-K2."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from ckpt_lib.layout.sharding import COLUMN, split
from mcore_harness import mcore_outputs, read_args
from mcore_versions import missing, outputs_under
from test_lora import ALPHA, R, reference_merge
from test_parity import mtp_reference
from util import (
    assert_same_conversion,
    assert_same_tensors,
    convert_inprocess,
    fuse_experts,
    hf_logits,
    make_deepseek_model,
    read_mcore_dir,
    read_safetensors_dir,
)

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
# V2-Lite's release YaRN (mscale = mscale_all_dim = 0.707) on a 16-position original length (see test_yarn)
V2_YARN = {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 16,
           "beta_fast": 32, "beta_slow": 1}
# Kimi-K2's release YaRN: factor 32 over 4096 positions, beta_fast = beta_slow = 1 (MLATransformerConfig's: 32 / 1), which
# moves the correction range of the 8 rotary dims here from dims [1, 3) to [2, 3)
KIMI_YARN = {"type": "yarn", "factor": 32, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
             "beta_fast": 1.0, "beta_slow": 1.0}
# V2-Lite: 64 experts top-6 greedy, 2 shared, 1 dense layer; the scale is 2 here (the release's 1) so that dropping it shows
V2_CONFIG = dict(vocab_size=100, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3,
                 routed_scaling_factor=2.0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                 v_head_dim=16, first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False, rms_norm_eps=1e-6,
                 max_position_embeddings=640, rope_scaling=V2_YARN, tie_word_embeddings=False)
# DeepSeek-V3 class (util.make_deepseek_model overrides). Moonlight: 64 experts top-6 in one group, 2 shared, scale 2.446;
# its release's rms_norm_eps 1e-5 is refused (test_release_configs), 1e-6 here; an MTP layer (the release has none) to
# check linear_q_proj there too
MOONLIGHT = dict(q_lora_rank=None, n_group=1, topk_group=1, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                 routed_scaling_factor=2.446, rope_theta=50000.0, num_nextn_predict_layers=1)
# Kimi-K2: 384 experts top-8 in one group (16 here), 1 shared, scale 2.827, 1 dense layer, no MTP
KIMI = dict(n_group=1, topk_group=1, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.827,
            first_k_dense_replace=1, num_nextn_predict_layers=0, rope_scaling=KIMI_YARN, max_position_embeddings=131072,
            rope_theta=50000.0)
LAYOUTS = {
    "tp1": [],
    "tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "pp2ep2": ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
}
FAMILIES = ("v2lite", "moonlight", "kimi")


def make_v2(directory, seed=0, **overrides):
    """A tiny DeepSeek-V2-Lite-style model with random norms and a router spread enough that the top-k weights matter."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**V2_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model, {}


def make_family(family, directory):
    """(transformers model, MTP tensors) of one family's tiny model saved in `directory`."""
    if family == "v2lite":
        return make_v2(directory)
    model, mtp = make_deepseek_model(directory, **(MOONLIGHT if family == "moonlight" else KIMI))
    if family == "kimi":  # the release's config.json: DeepSeek-V3 weights under model_type kimi_k2
        cfg = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}, indent=2))
    return model, mtp


MODELS: dict[str, tuple] = {}


def tiny(tmp_path_factory, family):
    """One tiny model per family for the module (built once)."""
    if family not in MODELS:
        path = tmp_path_factory.mktemp(family) / "hf"
        MODELS[family] = (*make_family(family, path), path)
    return MODELS[family]


def convert_to_mcore(family, path, out, *flags):
    """DeepSeek-V2 through loader_hf (which hands MLA configs to loader_hf_deepseek3), the others through
    loader_hf_deepseek3 itself (Moonlight-style with its MTP layer)."""
    loader, mtp = ("hf", []) if family == "v2lite" else ("hf_deepseek3", ["--mtp-num-layers", "1"] if family == "moonlight" else [])
    convert_inprocess(loader, "core_ext", path, out, "--saver-transformer-impl", "local", *mtp, *flags)


def diffs(ckpt, model, mtp):
    """Max abs difference of the logits (and MTP logits) of megatron-core from transformers'."""
    out = mcore_outputs(ckpt, TOKENS)
    main = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    if not mtp:
        return main, None
    return main, (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()


def rewrite(src, dst, edit):
    """A copy of a legacy checkpoint with each rank file's dict edited."""
    shutil.copytree(src, dst)
    for f in dst.glob("*/mp_rank_*/model_optim_rng.pt"):
        ckpt = torch.load(f, weights_only=False)
        edit(ckpt)
        torch.save(ckpt, f)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_and_round_trip(tmp_path, tmp_path_factory, family, layout):
    model, mtp, path = tiny(tmp_path_factory, family)
    convert_to_mcore(family, path, tmp_path / "mc", *LAYOUTS[layout])
    args, _ = read_args(tmp_path / "mc")
    v2 = family == "v2lite"
    assert args.multi_latent_attention and args.q_lora_rank == (24 if family == "kimi" else None)
    assert (args.moe_router_score_function, args.moe_router_pre_softmax, args.moe_router_enable_expert_bias) == (
        ("softmax", True, False) if v2 else ("sigmoid", False, True))
    assert args.moe_router_topk_scaling_factor == model.config.routed_scaling_factor
    if family == "kimi":  # one group of 16 experts, one dense layer, the release's YaRN
        assert (args.moe_router_num_groups, args.moe_router_group_topk, args.moe_layer_freq) == (1, 1, [0, 1, 1, 1])
        assert (args.rotary_scaling_factor, args.original_max_position_embeddings, args.beta_fast, args.beta_slow) == (32, 4096, 1, 1)
    names = {k for sd in read_mcore_dir(tmp_path / "mc").values() for k in sd}
    assert any(k.endswith("linear_q_proj.weight") for k in names) != (family == "kimi")
    assert any("expert_bias" in k for k in names) != v2
    main, extra = diffs(tmp_path / "mc", model, mtp)
    print(f"{family} {layout}: logits max abs diff {main:.2e}" + (f", MTP logits {extra:.2e}" if mtp else ""))
    assert main < 1e-4 and (extra is None or extra < 1e-4)
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((path / "config.json").read_text())


@pytest.mark.skipif(bool(missing("0.12.1")), reason="megatron-core 0.12.1 is not installed (make env)")
def test_plain_query_projection_in_0121(tmp_path, tmp_path_factory):
    """linear_q_proj (and its MTP layer) in megatron-core 0.12.1 too (0.19 is refused: it adds a norm of its own)."""
    model, mtp, path = tiny(tmp_path_factory, "moonlight")
    convert_to_mcore("moonlight", path, tmp_path / "mc", "--target-mcore-version", "0.12")
    out = outputs_under("0.12.1", tmp_path / "mc", TOKENS)
    main = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    extra = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    print(f"moonlight in megatron-core 0.12.1: logits max abs diff {main:.2e}, MTP logits {extra:.2e}")
    assert main < 1e-4 and extra < 1e-4


def negative_edit(family):
    """What a converter that got the family wrong would write: V2 without its scaling factor, Moonlight with two
    heads' q_proj rows swapped, Kimi without its YaRN factor (Kimi's beta 1 / 1 instead of 32 / 1 moves the logits
    of these 10 positions by only 2e-5: the parity test checks those args by value)."""
    def edit(ckpt):
        args, sd = ckpt["args"], ckpt["model"]
        if family == "v2lite":
            args.moe_router_topk_scaling_factor = None
        elif family == "moonlight":
            for name in [n for n in sd if n.endswith("linear_q_proj.weight")]:
                sd[name] = sd[name].reshape(4, 24, -1)[[1, 0, 2, 3]].reshape(sd[name].shape)
        else:
            del args.rotary_scaling_factor
    return edit


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_control_fails_parity(tmp_path, tmp_path_factory, family):
    model, mtp, path = tiny(tmp_path_factory, family)
    convert_to_mcore(family, path, tmp_path / "mc")
    rewrite(tmp_path / "mc", tmp_path / "wrong", negative_edit(family))
    main, _ = diffs(tmp_path / "wrong", model, mtp)
    print(f"{family} negative control: logits max abs diff {main:.2e}")
    assert main > 1e-3  # the check is < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_config_rebuilt_from_args(tmp_path, tmp_path_factory, family):
    """Exported without the recorded config (a Megatron-trained model) and without --hf-config-dir: config.json is
    rebuilt from args (DeepSeek-V2 for the softmax router, q_lora_rank null, YaRN) and transformers computes the
    original logits from it. Kimi-K2 comes out as the DeepSeek-V3 it is read as."""
    from transformers import AutoModelForCausalLM

    model, _, path = tiny(tmp_path_factory, family)
    convert_to_mcore(family, path, tmp_path / "mc", "--target-expert-parallel-size", "2")
    rewrite(tmp_path / "mc", tmp_path / "bare", lambda ckpt: setattr(ckpt["args"], "hf_config", None))
    convert_inprocess("core_ext", "hf", tmp_path / "bare", tmp_path / "out")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == ("deepseek_v2" if family == "v2lite" else "deepseek_v3")
    for key in ("q_lora_rank", "n_routed_experts", "num_experts_per_tok", "routed_scaling_factor", "n_shared_experts",
                "first_k_dense_replace", "norm_topk_prob", "rms_norm_eps", "max_position_embeddings"):
        assert cfg[key] == source[key], key
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (hf_logits(back, TOKENS) - hf_logits(model, TOKENS)).abs().max().item() == 0


def test_expressible_group_limited_v2_matches(tmp_path):
    """DeepSeek-V2's group_limited_greedy where megatron-core ranks groups as transformers does (by their best score:
    num_experts_per_tok // topk_group = 1): 2 of 4 groups kept, 3 experts chosen among their 4. (With top-k <= topk_group
    the limit never changes the choice; here it does: the same weights routed greedily give other logits.)"""
    model, _ = make_v2(tmp_path / "hf", seed=1, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    greedy, _ = make_v2(tmp_path / "greedy", seed=1)
    assert (hf_logits(model, TOKENS) - hf_logits(greedy, TOKENS)).abs().max() > 1e-3
    convert_to_mcore("v2lite", tmp_path / "hf", tmp_path / "mc")
    args, _ = read_args(tmp_path / "mc")
    assert (args.moe_router_num_groups, args.moe_router_group_topk, args.moe_router_topk) == (4, 2, 3)
    main, _ = diffs(tmp_path / "mc", model, {})
    print(f"v2 group_limited_greedy: logits max abs diff {main:.2e}")
    assert main < 1e-4


def test_fused_experts_and_te_names(tmp_path, tmp_path_factory):
    """A DeepSeek-V2 checkpoint with fused experts on disk converts to the same files as its per-expert twin; the
    Transformer Engine names of a plain query projection (linear_q_proj, the kv norm fused into linear_kv_up_proj)
    go back to HF bit for bit."""
    _, _, path = tiny(tmp_path_factory, "v2lite")
    fuse_experts(path, tmp_path / "fused")
    flags = ["--saver-transformer-impl", "transformer_engine", *LAYOUTS["tp2ep2"], "--experts-per-message", "3"]
    a = assert_same_conversion(path, tmp_path / "fused", tmp_path, *flags)
    names = set(a["mp_rank_01_001/model"])
    assert "decoder.layers.1.self_attention.linear_q_proj.weight" in names
    assert "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight" in names
    assert not any("q_down" in n or "q_up" in n for n in names)
    convert_inprocess("core_ext", "hf", tmp_path / "b", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))


def test_torch_dist_round_trip(tmp_path, tmp_path_factory):
    """--ckpt-format torch_dist (megatron-core's own sharded state dict: linear_q_proj, no expert bias) and back, bit-exact."""
    _, _, path = tiny(tmp_path_factory, "v2lite")
    convert_inprocess("hf", "core_ext", path, tmp_path / "td", "--ckpt-format", "torch_dist", "--target-expert-parallel-size", "2")
    convert_inprocess("core_ext", "hf", tmp_path / "td", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(path), read_safetensors_dir(tmp_path / "back"))


def test_save_fp8_quantizes_q_proj(tmp_path, tmp_path_factory):
    """--save-fp8 writes a plain q_proj block-scaled like the other MLA projections, and it reads back."""
    _, _, path = tiny(tmp_path_factory, "moonlight")
    convert_to_mcore("moonlight", path, tmp_path / "mc")
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "fp8", "--save-fp8", "--fp8-block-size", "16")
    fp8 = read_safetensors_dir(tmp_path / "fp8")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert fp8[name].dtype == torch.float8_e4m3fn and fp8[name + "_scale_inv"].shape == (6, 4)
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "fp8", tmp_path / "again", "--mtp-num-layers", "1",
                      "--params-dtype", "fp32")
    q = read_mcore_dir(tmp_path / "again")["mp_rank_00/model"]["decoder.layers.1.self_attention.linear_q_proj.weight"]
    assert (q - read_safetensors_dir(path)[name]).abs().max() < 0.1 * read_safetensors_dir(path)[name].abs().max()


def test_qlora_nf4_quantizes_linear_q_proj(tmp_path, tmp_path_factory):
    """--qlora-nf4 stores linear_q_proj in NF4 like the other MLA linears, and it reads back dequantized."""
    pytest.importorskip("bitsandbytes.functional")
    _, _, path = tiny(tmp_path_factory, "v2lite")
    convert_to_mcore("v2lite", path, tmp_path / "mc", "--qlora-nf4")
    sd = read_mcore_dir(tmp_path / "mc")["mp_rank_00/model"]
    name = "decoder.layers.1.self_attention.linear_q_proj.weight"
    assert sd[name].dtype == torch.uint8 and name + ".absmax" in sd
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    q, original = read_safetensors_dir(tmp_path / "back"), read_safetensors_dir(path)
    w = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(q[w], original[w]) and (q[w] - original[w]).abs().max() < 0.2 * original[w].abs().max()


# The published config.json fields that matter here (tokenizer ids, aux-loss and cache settings left out).
RELEASES = {
    "DeepSeek-V2-Lite": dict(
        model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
        norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                      "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
        attention_bias=False, hidden_act="silu", tie_word_embeddings=False, vocab_size=102400),
    "Moonlight-16B-A3B": dict(
        model_type="deepseek_v3", hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.446, rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=50000.0,
        rope_scaling=None, num_nextn_predict_layers=0, attention_bias=False, hidden_act="silu", tie_word_embeddings=False,
        vocab_size=163840),
    "Kimi-K2-Instruct": dict(
        model_type="kimi_k2", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=64, num_key_value_heads=64, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.827, rms_norm_eps=1e-6, max_position_embeddings=131072, rope_theta=50000.0,
        rope_scaling={"type": "yarn", "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0},
        num_nextn_predict_layers=0, attention_bias=False, hidden_act="silu", tie_word_embeddings=False, vocab_size=163840,
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}),
}


def release_metadata(cfg, **flags):
    from ckpt_lib.engine.hf_deepseek_loader import metadata
    from ckpt_lib.transport.protocol import metadata_from_spec

    return metadata_from_spec(metadata(dict(cfg), torch.bfloat16, argparse.Namespace(mtp_num_layers=0, **flags)))


def test_release_configs():
    """The published configs map as the tiny ones do; Moonlight's epsilon needs the explicit flag; the released
    DeepSeek-V2 (236B: 6 experts from 3 of 8 groups) and Kimi-K2-Thinking's INT4 are refused naming the field."""
    from ckpt_lib.errors import ConversionError

    lite = release_metadata(RELEASES["DeepSeek-V2-Lite"])
    assert (lite.q_lora_rank, lite.moe_router_score_function, lite.moe_router_pre_softmax, lite.moe_router_num_groups) == (
        None, "softmax", True, None)
    assert lite.rope_scaling["mscale_all_dim"] == 0.707 and not lite.moe_router_enable_expert_bias
    with pytest.raises(ConversionError, match="rms_norm_eps 1e-05"):
        release_metadata(RELEASES["Moonlight-16B-A3B"])
    moon = release_metadata(RELEASES["Moonlight-16B-A3B"], accept_latent_norm_eps=True)
    assert (moon.q_lora_rank, moon.norm_epsilon, moon.moe_router_topk_scaling_factor, moon.rope_scaling) == (None, 1e-5, 2.446, None)
    kimi = release_metadata(RELEASES["Kimi-K2-Instruct"])
    assert (kimi.num_experts, kimi.moe_router_num_groups, kimi.moe_router_group_topk, kimi.first_k_dense_replace) == (384, 1, 1, 1)
    assert kimi.rope_scaling["beta_fast"] == 1.0 and kimi.moe_shared_expert_intermediate_size == 2048
    v2 = dict(RELEASES["DeepSeek-V2-Lite"], hidden_size=5120, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
              q_lora_rank=1536, n_routed_experts=160, topk_method="group_limited_greedy", n_group=8, topk_group=3,
              routed_scaling_factor=16.0)
    with pytest.raises(ConversionError, match="n_group 8 / topk_group 3 / num_experts_per_tok 6"):
        release_metadata(v2)
    with pytest.raises(ConversionError, match="compressed-tensors"):
        release_metadata(dict(RELEASES["Kimi-K2-Instruct"], quantization_config=KIMI_INT4))  # Kimi-K2-Thinking


def refused(capsys, match, *argv):
    """The conversion stops with one `error:` line naming the field, nothing written."""
    with pytest.raises(SystemExit):
        convert_inprocess(*argv)
    err = capsys.readouterr().err
    assert match in err, err[-2000:]
    assert not argv[3].exists()


def edited_copy(src, dst, **fields):
    """The checkpoint with config.json fields replaced (None: removed)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


KIMI_INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 32, "symmetric": True}}}}
REFUSALS = {
    # the released DeepSeek-V2 236B: top-6 of 3 groups kept out of 8, each ranked by its best score
    "v2-group-limited": ("v2lite", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=4),
                         "ranks each group by its best score"),
    "v2-epsilon": ("v2lite", dict(rms_norm_eps=1e-5), "rms_norm_eps 1e-05"),
    "v2-renormalised": ("v2lite", dict(norm_topk_prob=True), "norm_topk_prob true"),
    "v3-group-ranking": ("kimi", dict(n_group=4, topk_group=2, num_experts_per_tok=2), "sum of its two best scores"),
    "v3-top1-renormalised": ("kimi", dict(num_experts_per_tok=1), "num_experts_per_tok 1 with norm_topk_prob true"),
    "moonlight-epsilon": ("moonlight", dict(rms_norm_eps=1e-5), "--accept-latent-norm-eps"),
    "kimi-int4": ("kimi", dict(quantization_config=KIMI_INT4), "quant_method 'compressed-tensors'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inexpressible_configs_are_refused(tmp_path, tmp_path_factory, capsys, case):
    family, fields, message = REFUSALS[case]
    _, _, path = tiny(tmp_path_factory, family)
    refused(capsys, message, "hf", "core_ext", edited_copy(path, tmp_path / "hf", **fields), tmp_path / "mc")


def test_moonlight_epsilon_on_request_and_targets_refused(tmp_path, tmp_path_factory, capsys):
    """Moonlight's release epsilon (1e-5) converts with --accept-latent-norm-eps (Megatron's one epsilon then applies
    to the latent norm too); MindSpeed-LLM names are refused for a plain query projection, and so is megatron-core 0.19
    (it fuses a norm of its own into linear_q_proj)."""
    _, _, path = tiny(tmp_path_factory, "moonlight")
    src = edited_copy(path, tmp_path / "hf", rms_norm_eps=1e-5)
    convert_inprocess("hf_deepseek3", "core_ext", src, tmp_path / "mc", "--accept-latent-norm-eps")
    assert read_args(tmp_path / "mc")[0].norm_epsilon == 1e-5
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rms_norm_eps"] == 1e-5
    refused(capsys, "MLA without q_lora_rank", "hf_deepseek3", "core_ext", path, tmp_path / "ms", "--naming", "mindspeed")
    refused(capsys, "fuses a norm into linear_q_proj", "hf_deepseek3", "core_ext", path, tmp_path / "v19", "--target-mcore-version", "0.19")


def test_lora_on_linear_q_proj_merges_and_exports_to_peft(tmp_path, tmp_path_factory):
    """Moonlight-style at TP2: LoRA on `linear_q_proj` (column-parallel: lora_A whole, lora_B split by rows) and on the
    kv up projection merges into q_proj / kv_b_proj exactly, and exports as a PEFT adapter on q_proj / kv_b_proj whose
    PEFT merge equals ours bit for bit."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, path = tiny(tmp_path_factory, "moonlight")
    hf = read_safetensors_dir(path)
    convert_inprocess("hf", "core_ext", path, tmp_path / "mc", "--saver-transformer-impl", "local", "--target-tensor-parallel-size", "2")
    gen = torch.Generator().manual_seed(7)
    adapters = {(layer, mod): (0.05 * torch.randn(R, cols, generator=gen), 0.05 * torch.randn(rows, R, generator=gen))
                for layer in range(4) for mod, rows, cols in (("linear_q_proj", 96, 64), ("linear_kv_up_proj", 128, 16))}
    lora_only = tmp_path / "lora_only"
    for f in sorted((tmp_path / "mc").glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        tp_rank = int(f.parent.name[8:10])
        ckpt = torch.load(f, weights_only=False)
        sd, lora_sd = ckpt["model"], {}
        for (layer, mod), (a, b) in adapters.items():
            name = f"decoder.layers.{layer}.self_attention.{mod}"
            sd[name + ".base_layer.weight"] = sd.pop(name + ".weight")
            lora_sd[name + ".lora_A.default.weight"], lora_sd[name + ".lora_B.default.weight"] = a.clone(), split(b, COLUMN, 2)[tp_rank].clone()
        sd.update(lora_sd)
        torch.save(ckpt, f)
        target = lora_only / f.relative_to(tmp_path / "mc")
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**ckpt, "model": lora_sd}, target)
    (lora_only / "latest_checkpointed_iteration.txt").write_text((tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text())
    lora = ["--lora-r", str(R), "--lora-alpha", str(ALPHA)]
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "merged", *lora)
    hf_names = {"linear_q_proj": "self_attn.q_proj", "linear_kv_up_proj": "self_attn.kv_b_proj"}
    want = reference_merge(hf, {f"model.layers.{layer}.{hf_names[mod]}": pair for (layer, mod), pair in adapters.items()})
    ours = read_safetensors_dir(tmp_path / "merged")  # the MTP layer was not converted
    assert all(torch.equal(t, want[n]) for n, t in ours.items())
    adapted = [f"model.layers.{layer}.{hf_names[mod]}.weight" for layer, mod in adapters]
    convert_inprocess("core_ext", "hf", lora_only, tmp_path / "peft", "--save-lora-to-hf", *lora, "--hf-config-dir", str(path))
    assert sorted(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]) == ["kv_b_proj", "q_proj"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    merged = peft_model.merge_and_unload().state_dict()
    for name in adapted:
        assert torch.equal(merged[name], ours[name]), name


def test_verify_reads_kimi_and_compares_logits(tmp_path, tmp_path_factory):
    """verify.py picks the MLA loader for model_type kimi_k2 and runs the HF side as DeepSeek-V3 for --logits."""
    from ckpt_lib.engine import verify
    from ckpt_verify import cli

    _, _, path = tiny(tmp_path_factory, "kimi")
    convert_to_mcore("kimi", path, tmp_path / "mc")
    assert verify.detect_loader(path) == "hf_deepseek3"
    lines: list[str] = []
    assert cli.compare_logits(path, tmp_path / "mc", 1e-4, lines.append), lines
    assert "top-1 agreement 100.0%" in lines[0]
