"""Names for the megatron-core release that loads the output (--target-mcore-version), and the metadata
forms upstream Megatron-LM's savers and loaders exchange with ours (the real upstream runs are in
test_upstream.py, real megatron-core 0.12/0.19 loads in test_mcore_versions.py)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import queue
import types

import pytest
import torch

from ckpt_lib.errors import ConversionError
from ckpt_lib.families import deepseek, mcore_version
from ckpt_lib.transport import protocol as P
from ckpt_lib.transport.spec import LoraExport, RopeScaling
from util import (
    DEEPSEEK_CONFIG,
    assert_same_tensors,
    convert_cli,
    convert_inprocess,
    make_deepseek_model,
    read_mcore_dir,
    read_safetensors_dir,
)

MTP = ["--mtp-num-layers", "1", "--saver-transformer-impl", "local"]
LAYOUT = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"]


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "hf"
    make_deepseek_model(path)
    return path


def mtp_names(directory) -> set[str]:
    return {k for sd in read_mcore_dir(directory).values() for k in sd if k.startswith("mtp.layers.0.")}


def test_target_019_names_read_back_bit_exact(tmp_path, ds_dir):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "new", *MTP, *LAYOUT, "--target-mcore-version", "0.19")
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "old", *MTP, *LAYOUT, "--target-mcore-version", "0.16")
    new, old = mtp_names(tmp_path / "new"), mtp_names(tmp_path / "old")
    assert any(".mtp_model_layer." in k for k in new) and not any(".transformer_layer." in k for k in new)
    assert {k.replace(".mtp_model_layer.", ".transformer_layer.") for k in new} == old
    args = torch.load(next((tmp_path / "new").rglob("model_optim_rng.pt")), weights_only=False)["args"]
    assert args.target_mcore_version == "0.19"
    manifest = json.loads((tmp_path / "new" / "conversion_manifest.json").read_text())
    assert manifest["target"] == {"megatron_core": "0.19", "chosen_by": "--target-mcore-version"}
    # Either naming is read back (detected): to HF bit for bit, and 0.19 -> 0.16 names equals a direct 0.16 conversion.
    convert_inprocess("core_ext", "hf", tmp_path / "new", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(ds_dir), read_safetensors_dir(tmp_path / "back"))
    convert_inprocess("core_ext", "core_ext", tmp_path / "new", tmp_path / "again", *LAYOUT, "--saver-transformer-impl", "local",
                      "--target-mcore-version", "0.16.1")
    before, after = read_mcore_dir(tmp_path / "old"), read_mcore_dir(tmp_path / "again")
    assert sorted(before) == sorted(after)
    for k in before:
        assert_same_tensors(before[k], after[k])


def test_mindspeed_profile_keeps_its_names(tmp_path, ds_dir):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "ms", *MTP, "--naming", "mindspeed", "--target-mcore-version", "0.19")
    assert any(".transformer_layer." in k for k in mtp_names(tmp_path / "ms"))


def test_default_version_comes_from_the_checkout_then_installed(tmp_path):
    info = tmp_path / "Megatron-LM" / "megatron" / "core"
    info.mkdir(parents=True)
    (info / "package_info.py").write_text("MAJOR = 0\nMINOR = 20\nPATCH = 0\nPRE_RELEASE = 'rc0'\n")
    assert mcore_version.resolve(None, str(tmp_path / "Megatron-LM")).version == (0, 20)
    assert mcore_version.resolve("0.12", str(tmp_path / "Megatron-LM")).version == (0, 12)
    installed = mcore_version.resolve(None)  # the plugins here are not inside a checkout
    assert installed.version == mcore_version.parse(importlib.metadata.version("megatron-core"))
    assert installed.source == "installed megatron-core"
    assert mcore_version.Target((0, 20), "").mtp_submodule == "mtp_model_layer"
    assert mcore_version.Target((0, 16), "").mtp_submodule == "transformer_layer"


def test_bad_version_is_one_error_line(tmp_path, ds_dir):
    result = convert_cli("--loader", "hf_deepseek3", "--saver", "core_ext", "--load-dir", str(ds_dir),
                         "--save-dir", str(tmp_path / "out"), *MTP, "--target-mcore-version", "latest")
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert "--target-mcore-version: 'latest' is not a megatron-core version" in result.stderr.strip().splitlines()[-1]


def _metadata(**changes) -> argparse.Namespace:
    fields = {f: None for f in P.UPSTREAM_FIELDS + P.EXTENSION_FIELDS}
    fields.update(model_type="GPT", num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2, kv_channels=4,
                  ffn_hidden_size=16, qk_layernorm=False, linear_bias=False, qkv_bias=False, output_layer=True,
                  params_dtype=torch.float32, normalization="RMSNorm", norm_epsilon=1e-6, rotary_base=10000, swiglu=True,
                  true_vocab_size=10, make_vocab_size_divisible_by=128, tokenizer_type=None, seq_length=16,
                  max_position_embeddings=16, position_embedding_type="rope")
    fields.update(changes)
    return P.make_metadata(**fields)


def test_dense_metadata_as_upstream_saver_core_needs_it():
    """saver_base.build_sys_argv passes --num-experts str(getattr(md, "num_experts", 0)): a dense model's
    metadata must not carry the field, and checkpoint_args.num_experts must be None (0 fails validate_args)."""
    q: queue.Queue = queue.Queue()
    md = _metadata()
    P.send_metadata(q, md, argparse.Namespace(saver="core"))
    wire = q.get_nowait()
    assert not hasattr(wire, "num_experts") and wire.checkpoint_args.num_experts is None
    assert md.num_experts is None and not hasattr(md.checkpoint_args, "num_experts")  # the loader's own copy is unchanged
    assert P.normalize_metadata(wire).num_experts is None


@pytest.mark.parametrize("feature, expected", [({"qk_layernorm": True}, "q/k layernorm"),
                                               ({"num_experts": 4}, "MoE experts")])
def test_upstream_saver_refuses_what_it_cannot_hold(feature, expected):
    with pytest.raises(ConversionError, match=rf"upstream saver_core cannot hold this model \({expected}"):
        P.send_metadata(queue.Queue(), _metadata(**feature), argparse.Namespace(saver="core"))
    P.send_metadata(queue.Queue(), _metadata(**feature), argparse.Namespace(saver="core_ext"))  # ours can


def test_savers_take_upstream_simple_namespace():
    """Upstream loaders send a types.SimpleNamespace with model options only in checkpoint_args."""
    md = types.SimpleNamespace(**{k: v for k, v in vars(_metadata()).items() if k in P.UPSTREAM_FIELDS and k != "num_experts"})
    md.checkpoint_args = types.SimpleNamespace(ffn_hidden_size=16, group_query_attention=True, num_query_groups=1,
                                               normalization="RMSNorm", num_experts=None)
    q: queue.Queue = queue.Queue()
    q.put(md)
    got = P.receive_metadata(P.MessageReader(q))
    assert isinstance(got, argparse.Namespace) and got.num_query_groups == 1 and got.num_experts is None
    q.put(types.SimpleNamespace(**{**vars(md), "checkpoint_args": types.SimpleNamespace(num_experts=8)}))
    with pytest.raises(ConversionError, match="upstream loader's MoE checkpoint"):
        P.receive_metadata(P.MessageReader(q))
    q.put({"name": "embeddings"})
    with pytest.raises(ConversionError, match="must be the metadata namespace"):
        P.receive_metadata(P.MessageReader(q))


def test_spec_survives_the_queue_form():
    """The metadata Namespace carries the whole spec: the saver reads back the spec the loader sent (MLA, MoE,
    YaRN, LoRA export, a worker's layers; and a dense model with none of them)."""
    mla_moe = deepseek.metadata_from_hf(DEEPSEEK_CONFIG, torch.bfloat16, 1)
    dense = dataclasses.replace(mla_moe, mla=None, moe=None, mtp_num_layers=0, qk_layernorm=True, hf_config=None)
    extras = dataclasses.replace(mla_moe, rope_scaling=RopeScaling(40.0, 1.0, 0.707, 4096, 32.0, 1.0),
                                 lora_export=LoraExport(8, 16.0, True), share_layers=(0, 2))
    for spec in (mla_moe, dense, extras):
        q: queue.Queue = queue.Queue()
        P.send_spec(q, spec, argparse.Namespace(saver="core_ext"))
        assert P.receive_spec(P.MessageReader(q)) == spec
