"""DeepSeek-V3 (MLA, MoE, MTP): bit-exact HF -> mcore -> HF in every layout, and mcore resharding."""

from __future__ import annotations

import pytest
import torch

from util import (
    DEEPSEEK_LAYOUTS,
    assert_same_tensors,
    convert_inprocess,
    make_deepseek_model,
    read_mcore_dir,
    read_safetensors_dir,
)

MTP = ["--mtp-num-layers", "1"]
LAYOUTS = DEEPSEEK_LAYOUTS


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


MINDSPEED = {
    "plain": [],
    "gg_tp2_ep2": ["--moe-grouped-gemm", "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "mm_split_tp2": ["--mla-mm-split", "--target-tensor-parallel-size", "2"],
    "tp_extend": ["--moe-grouped-gemm", "--moe-tp-extend-ep", "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "dualpipev": ["--moe-grouped-gemm", "--moe-tp-extend-ep", "--target-tensor-parallel-size", "2",
                  "--target-pipeline-parallel-size", "2", "--schedules-method", "dualpipev"],
    "noop_vpp": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--noop-layers", "1,4",
                 "--num-layers", "6", "--mla-mm-split", "--moe-grouped-gemm"],
}


@pytest.mark.parametrize("variant", list(MINDSPEED))
def test_mindspeed_profile_round_trip(tmp_path, ds_dir, variant):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", "--naming", "mindspeed", *MTP, *MINDSPEED[variant])
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(ds_dir), read_safetensors_dir(tmp_path / "back"))


def test_mindspeed_names_and_grouped_layout(tmp_path, ds_dir):
    """weight1 is a raw reshape of [E_loc, H, 2F/TP] whose expert slice is [gate_t; up_t]^T."""
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", "--naming", "mindspeed", *MTP,
                      "--moe-grouped-gemm", "--mla-mm-split", "--target-tensor-parallel-size", "2",
                      "--target-expert-parallel-size", "2")
    src = read_safetensors_dir(ds_dir)
    sd = read_mcore_dir(tmp_path / "mc")["mp_rank_01_001/model"]  # tp 1, ep 1: experts 4..7
    h, f, tp = 64, 32, 2
    w1 = sd["decoder.layers.2.mlp.experts.weight1"]
    assert w1.shape == (h, 4 * 2 * f // tp)
    per_expert = w1.reshape(4, h, 2 * f // tp)
    for local in range(4):
        e = 4 + local
        gate = src[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"].chunk(tp)[1]
        up = src[f"model.layers.2.mlp.experts.{e}.up_proj.weight"].chunk(tp)[1]
        assert torch.equal(per_expert[local], torch.cat([gate, up]).t())
    w2 = sd["decoder.layers.2.mlp.experts.weight2"].reshape(4, f // tp, h)
    assert torch.equal(w2[1], src["model.layers.2.mlp.experts.5.down_proj.weight"].chunk(tp, dim=1)[1].t())
    fused = sd["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(fused, torch.cat([src["model.layers.0.self_attn.q_a_proj.weight"],
                                         src["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]]))
    q_b = src["model.layers.0.self_attn.q_b_proj.weight"].reshape(4, 24, 24)
    assert torch.equal(sd["decoder.layers.0.self_attention.linear_qk_rope.weight"], q_b[2:, 16:].reshape(-1, 24))
    assert "final_layernorm.weight" in sd and "mtp.final_layernorms.0.weight" in sd
    assert not any("linear_q_up_proj" in k or "local_experts" in k for k in sd)


def test_tp_extend_ep_buckets(tmp_path, ds_dir):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", "--naming", "mindspeed", "--moe-grouped-gemm",
                      "--moe-tp-extend-ep", "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2")
    src = read_safetensors_dir(ds_dir)
    # bucket b = ep*TP + tp = 1*2 + 1 = 3 holds experts 6, 7 unsplit
    w1 = read_mcore_dir(tmp_path / "mc")["mp_rank_01_001/model"]["decoder.layers.3.mlp.experts.weight1"].reshape(2, 64, 64)
    assert torch.equal(w1[1], torch.cat([src["model.layers.3.mlp.experts.7.gate_proj.weight"],
                                         src["model.layers.3.mlp.experts.7.up_proj.weight"]]).t())


@pytest.mark.parametrize("flags,message", [
    (["--mla-mm-split"], "--naming mindspeed"),
    (["--naming", "mindspeed", "--moe-tp-extend-ep"], "needs --moe-grouped-gemm"),
    (["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3", "--noop-layers", "5"], "cannot be used together"),
    (["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3", "--num-layers-per-virtual-pipeline-stage", "1"],
     "cannot be used together"),
    (["--naming", "mindspeed", "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
      "--schedules-method", "dualpipev"], "needs --moe-tp-extend-ep"),
    (["--mtp-num-layers", "2"], "only 0 or 1"),
    (["--first-k-dense-replace", "2"], "disagrees with config.json"),
    (["--num-layers", "61"], "should be config.json num_hidden_layers"),
])
def test_seed_exclusions_fail_before_writing(tmp_path, ds_dir, flags, message):
    with pytest.raises((SystemExit, Exception)):
        convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", *flags)
    assert not (tmp_path / "mc").exists()
    assert not list(tmp_path.glob(".mc.partial-*"))


def test_local_grouped_gemm_is_legacy_grouped_mlp(tmp_path, ds_dir):
    convert_inprocess("hf_deepseek3", "core_ext", ds_dir, tmp_path / "mc", "--saver-transformer-impl", "local", "--moe-grouped-gemm",
                      *MTP)
    sd = read_mcore_dir(tmp_path / "mc")["mp_rank_00/model"]
    assert "decoder.layers.1.mlp.experts.weight1" in sd
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(read_safetensors_dir(ds_dir), read_safetensors_dir(tmp_path / "back"))
