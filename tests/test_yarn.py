"""DeepSeek-V3's YaRN RoPE scaling: carried in the metadata and written into `args` under the names Megatron reads,
so that a model built from the checkpoint's own args (mcore_model.transformer_config, as Megatron-LM builds it) computes
transformers' rotary frequencies and MLA softmax scale. The tiny model's original length (16, max positions 640 =
40 x 16) puts YaRN's correction range inside its 8 rotary dims, so the frequencies change, not just the scales."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mcore_versions import missing, outputs_under
from test_parity import mtp_reference
from util import assert_same_tensors, convert_inprocess, hf_logits, make_deepseek_model, make_hf_model, read_safetensors_dir

TOKENS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
YARN = {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1}
LAYOUT = ["--saver-transformer-impl", "local", "--mtp-num-layers", "1", "--target-tensor-parallel-size", "2",
          "--target-expert-parallel-size", "2"]
ARG_NAMES = ("rope_type", "rotary_scaling_factor", "mscale", "mscale_all_dim", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow")


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("yarn")
    model, mtp = make_deepseek_model(root / "hf", rope_scaling=dict(YARN), max_position_embeddings=640)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    return root, model, mtp


def rank_files(ckpt):
    return sorted(ckpt.glob("*/mp_rank_*/model_optim_rng.pt"))


def rewrite_args(src, dst, edit):
    """A copy of the checkpoint whose args went through `edit`."""
    shutil.copytree(src, dst)
    for f in rank_files(dst):
        ckpt = torch.load(f, map_location="cpu", weights_only=False)
        edit(ckpt["args"])
        torch.save(ckpt, f)


def diffs(out, model, mtp):
    main = (out["logits"][..., :100] - hf_logits(model, TOKENS)).abs().max().item()
    extra = (out["mtp_logits"][..., :100] - mtp_reference(model, mtp, TOKENS)).abs().max().item()
    return main, extra


def test_yarn_args_and_parity_in_0161_with_negative_control(yarn_model):
    root, model, mtp = yarn_model
    convert_inprocess("hf_deepseek3", "core_ext", root / "hf", root / "mc", *LAYOUT)
    args = torch.load(rank_files(root / "mc")[0], weights_only=False)["args"]
    assert (args.rope_type, args.rotary_scaling_factor, args.mscale, args.mscale_all_dim) == ("yarn", 40.0, 1.0, 1.0)
    assert (args.original_max_position_embeddings, args.beta_fast, args.beta_slow) == (16, 32.0, 1.0)
    assert (args.yarn_original_max_position_embeddings, args.yarn_beta_fast, args.yarn_beta_slow) == (16, 32.0, 1.0)
    assert args.max_position_embeddings == 640 and not hasattr(args, "rope_scaling_type")
    main, extra = diffs(outputs_under("0.16.1", root / "mc", TOKENS), model, mtp)
    print(f"megatron-core 0.16.1 YaRN TP2xEP2: logits max abs diff {main:.2e}, MTP logits {extra:.2e}")
    assert main < 1e-4 and extra < 1e-4

    def strip(a):
        for name in ARG_NAMES:
            delattr(a, name)
    rewrite_args(root / "mc", root / "plain", strip)  # what a converter that ignores rope_scaling wrote
    main, extra = diffs(outputs_under("0.16.1", root / "plain", TOKENS), model, mtp)
    print(f"negative control (YaRN fields removed from args): logits max abs diff {main:.2e}, MTP logits {extra:.2e}")
    assert main > 1e-3 and extra > 1e-3


@pytest.mark.skipif(bool(missing("0.19.2")), reason="megatron-core 0.19.2 is not installed (make env)")
def test_yarn_parity_in_0192(yarn_model, tmp_path):
    root, model, mtp = yarn_model
    convert_inprocess("hf_deepseek3", "core_ext", root / "hf", tmp_path / "mc", *LAYOUT, "--target-mcore-version", "0.19")
    main, extra = diffs(outputs_under("0.19.2", tmp_path / "mc", TOKENS), model, mtp)
    print(f"megatron-core 0.19.2 YaRN TP2xEP2: logits max abs diff {main:.2e}, MTP logits {extra:.2e}")
    assert main < 1e-4 and extra < 1e-4


def test_mcore_to_hf_rebuilds_rope_scaling_from_args(yarn_model, tmp_path):
    """Without the recorded hf_config (and without --hf-config-dir) config.json is rebuilt from args, YaRN included;
    transformers loads it and computes the original logits. With hf_config, that config is kept."""
    from transformers import AutoModelForCausalLM

    root, model, _ = yarn_model
    convert_inprocess("hf_deepseek3", "core_ext", root / "hf", tmp_path / "mc", "--mtp-num-layers", "1",
                      "--target-expert-parallel-size", "2")
    rewrite_args(tmp_path / "mc", tmp_path / "bare", lambda a: setattr(a, "hf_config", None))
    for src, out in ((tmp_path / "bare", tmp_path / "rebuilt"), (tmp_path / "mc", tmp_path / "kept")):
        convert_inprocess("core_ext", "hf", src, out)
        assert_same_tensors(read_safetensors_dir(root / "hf"), read_safetensors_dir(out))
    rebuilt = json.loads((tmp_path / "rebuilt" / "config.json").read_text())
    assert rebuilt["rope_scaling"] == YARN and rebuilt["max_position_embeddings"] == 640
    kept = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert kept["rope_parameters"] == json.loads((root / "hf" / "config.json").read_text())["rope_parameters"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt", dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    assert (hf_logits(back, TOKENS) - hf_logits(model, TOKENS)).abs().max().item() == 0


def test_mindspeed_names_plain_rope_and_loader_round_trip(yarn_model, tmp_path):
    """MindSpeed-LLM's rope_scaling_* names besides Megatron's; plain-RoPE DeepSeek gets rope_type 'rope' and factor 1;
    loader_core_ext reads the fields back (a reshard keeps them)."""
    root, _, _ = yarn_model
    convert_inprocess("hf_deepseek3", "core_ext", root / "hf", tmp_path / "ms", "--naming", "mindspeed", "--mtp-num-layers", "1")
    a = torch.load(rank_files(tmp_path / "ms")[0], weights_only=False)["args"]
    assert (a.rope_scaling_type, a.rope_scaling_factor, a.rope_scaling_mscale, a.rope_scaling_mscale_all_dim) == ("yarn", 40.0, 1.0, 1.0)
    assert (a.rope_scaling_beta_fast, a.rope_scaling_beta_slow, a.rope_scaling_original_max_position_embeddings) == (32.0, 1.0, 16)
    assert a.rope_type == "yarn" and a.rotary_scaling_factor == 40.0
    convert_inprocess("core_ext", "core_ext", tmp_path / "ms", tmp_path / "again", "--target-expert-parallel-size", "2")
    b = torch.load(rank_files(tmp_path / "again")[0], weights_only=False)["args"]
    assert all(getattr(b, n) == getattr(a, n) for n in ARG_NAMES)
    make_deepseek_model(tmp_path / "plain")
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "plain", tmp_path / "plain_mc")
    p = torch.load(rank_files(tmp_path / "plain_mc")[0], weights_only=False)["args"]
    assert (p.rope_type, p.rotary_scaling_factor, p.mscale) == ("rope", 1.0, 1.0)


def test_mindspore_model_config_yarn(tmp_path):
    """loader_core_mf takes YaRN from --model-config like the HF loader."""
    from test_mindspore import FIXTURES

    cfg = json.loads((FIXTURES / "hf_deepseek3" / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"], cfg["rope_theta"] = dict(YARN, original_max_position_embeddings=4096), 10000.0
    cfg["max_position_embeddings"] = 163840
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    convert_inprocess("core_mf", "core_ext", FIXTURES / "deepseek3", tmp_path / "mc", "--params-dtype", "fp32",
                      "--model-config", str(tmp_path / "cfg"), "--saver-transformer-impl", "local")
    a = torch.load(rank_files(tmp_path / "mc")[0], weights_only=False)["args"]
    assert (a.rope_type, a.rotary_scaling_factor, a.mscale_all_dim, a.original_max_position_embeddings) == ("yarn", 40.0, 1.0, 4096)
    assert a.max_position_embeddings == 163840


def refused(capsys, match, *argv):
    """The conversion stops with one `error:` line naming the field, nothing written."""
    with pytest.raises(SystemExit):
        convert_inprocess(*argv)
    err = capsys.readouterr().err
    assert match in err, err[-2000:]
    assert not argv[3].exists()


def test_inexpressible_rope_is_refused(tmp_path, capsys):
    make_deepseek_model(tmp_path / "llama3", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                        num_nextn_predict_layers=0)
    refused(capsys, "rope_parameters.rope_type 'llama3'", "hf_deepseek3", "core_ext", tmp_path / "llama3", tmp_path / "out")
    make_hf_model("llama", tmp_path / "dense", rope_scaling=dict(YARN, rope_type="yarn"))
    refused(capsys, "rope_type 'yarn' is not supported", "hf", "core_ext", tmp_path / "dense", tmp_path / "out2")
    make_deepseek_model(tmp_path / "odd", rope_scaling=dict(YARN, mscale=0.707), max_position_embeddings=640, num_nextn_predict_layers=0)
    refused(capsys, "mscale 0.707 != mscale_all_dim 1.0", "hf_deepseek3", "core_ext", tmp_path / "odd", tmp_path / "out3",
            "--target-mcore-version", "0.12")
