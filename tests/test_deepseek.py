"""DeepSeek-V3 (MLA, MoE, MTP): bit-exact HF -> mcore -> HF in every layout, and mcore resharding."""

from __future__ import annotations

import pytest
import torch

from util import assert_same_tensors, convert_inprocess, make_deepseek_model, read_mcore_dir, read_safetensors_dir

MTP = ["--mtp-num-layers", "1"]
LAYOUTS = {
    "tp2": ["--target-tensor-parallel-size", "2"],
    "ep2": ["--target-expert-parallel-size", "2"],
    "pp2": ["--target-pipeline-parallel-size", "2"],
    "tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "tp2pp2ep2": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "vpp": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "uneven": ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"],
    "noop": ["--target-pipeline-parallel-size", "2", "--noop-layers", "4,5", "--num-layers", "6"],
    "dualpipev": ["--target-pipeline-parallel-size", "2", "--schedules-method", "dualpipev"],
}


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "hf"
    make_deepseek_model(path)
    return path


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_mcore_hf_is_bit_exact(tmp_path, ds_dir, layout, impl):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", "--saver-transformer-impl", impl, *MTP, *LAYOUTS[layout])
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(ds_dir), read_safetensors_dir(tmp_path / "back"))


def test_mtp_skipped_without_flag(tmp_path, ds_dir):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", "--saver-transformer-impl", "local")
    names = {k for sd in read_mcore_dir(tmp_path / "mc").values() for k in sd}
    assert not any(k.startswith("mtp.") for k in names)


def test_expert_placement_and_mtp_on_last_stage(tmp_path, ds_dir):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", "--saver-transformer-impl", "local", *MTP,
                      "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2")
    files = read_mcore_dir(tmp_path / "mc")
    src = read_safetensors_dir(ds_dir)
    last = files["mp_rank_00_001_001/model"]
    # EP rank 1 holds experts 4..7 as local 0..3; layer 3 is local layer 1 of stage 1
    fc1 = last["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
    expected = torch.cat([src["model.layers.3.mlp.experts.6.gate_proj.weight"], src["model.layers.3.mlp.experts.6.up_proj.weight"]])
    assert torch.equal(fc1, expected)
    assert "mtp.layers.0.transformer_layer.mlp.router.expert_bias" in last and "embedding.word_embeddings.weight" in last
    assert last["mtp.layers.0.transformer_layer.mlp.router.expert_bias"].dtype == torch.float32
    assert not any(k.startswith("mtp.") for k in files["mp_rank_00_000_000/model"])


def test_mcore_reshard_is_bit_exact(tmp_path, ds_dir):
    a = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2",
         "--saver-transformer-impl", "local"]
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "a", *MTP, *a)
    convert_inprocess("core_ext", "core_ext", tmp_path / "a", tmp_path / "b", "--target-tensor-parallel-size", "1",
                      "--target-pipeline-parallel-size", "4", "--target-expert-parallel-size", "4", "--saver-transformer-impl",
                      "transformer_engine")
    convert_inprocess("core_ext", "core_ext", tmp_path / "b", tmp_path / "c", *a)
    before, after = read_mcore_dir(tmp_path / "a"), read_mcore_dir(tmp_path / "c")
    assert sorted(before) == sorted(after)
    for k in before:
        assert_same_tensors(before[k], after[k])
