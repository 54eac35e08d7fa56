"""torch_dist (megatron-core dist_checkpointing) output and input: the files load in real megatron-core
models at several layouts with logits parity, and torch_dist -> HF / legacy reproduces the input bit for bit."""

from __future__ import annotations

import pytest
import torch

from mcore_harness import mcore_outputs
from test_parity import TOKENS, mtp_reference
from util import (
    assert_same_tensors,
    convert_cli,
    convert_inprocess,
    hf_logits,
    make_deepseek_model,
    make_hf_model,
    read_mcore_dir,
    read_safetensors_dir,
)

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1)]


def test_dense_torch_dist_loads_at_any_layout(tmp_path, monkeypatch):
    """Written tensor by tensor into several data files."""
    from ckpt_lib.io import torch_dist

    monkeypatch.setattr(torch_dist, "FILE_BYTES", 100_000)
    model = make_hf_model("qwen3", tmp_path / "hf")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "td", "--ckpt-format", "torch_dist",
                      "--target-tensor-parallel-size", "2")
    assert (tmp_path / "td" / "iter_0000001" / ".metadata").is_file()
    reference = hf_logits(model, TOKENS)
    for layout in LAYOUTS:
        logits = mcore_outputs(tmp_path / "td", TOKENS, layout)["logits"]
        diff = (logits[..., : reference.shape[-1]] - reference).abs().max().item()
        print(f"qwen3 torch_dist at TP{layout[0]} PP{layout[1]}: max abs diff {diff:.2e}")
        assert diff < 1e-4


def test_dense_torch_dist_round_trips_bit_exact(tmp_path):
    make_hf_model("llama", tmp_path / "hf", dtype=torch.bfloat16)
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "td", "--ckpt-format", "torch_dist")
    convert_inprocess("core_ext", "hf", tmp_path / "td", tmp_path / "back", "--hf-config-dir", str(tmp_path / "hf"))
    assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "back"))
    # torch_dist -> legacy TP2 equals HF -> legacy TP2 directly
    convert_inprocess("core_ext", "core_ext", tmp_path / "td", tmp_path / "legacy", "--target-tensor-parallel-size", "2",
                      "--saver-transformer-impl", "local")
    convert_inprocess("hf", "core_ext", tmp_path / "hf", tmp_path / "direct", "--target-tensor-parallel-size", "2",
                      "--saver-transformer-impl", "local")
    direct, legacy = read_mcore_dir(tmp_path / "direct"), read_mcore_dir(tmp_path / "legacy")
    assert sorted(direct) == sorted(legacy)
    for rank in direct:
        assert_same_tensors({k: v for k, v in direct[rank].items() if not k.endswith("_extra_state")},
                            {k: v for k, v in legacy[rank].items() if not k.endswith("_extra_state")})


def test_deepseek_torch_dist_with_mtp(tmp_path, monkeypatch):
    """MLA + MoE + MTP: one torch_dist checkpoint, loaded by megatron-core at TP2 and at PP2 x EP2."""
    from ckpt_lib.io import torch_dist

    monkeypatch.setattr(torch_dist, "FILE_BYTES", 200_000)
    model, mtp = make_deepseek_model(tmp_path / "hf")
    convert_inprocess("hf_deepseek3", "core_ext", tmp_path / "hf", tmp_path / "td", "--ckpt-format", "torch_dist",
                      "--mtp-num-layers", "1")
    reference, mtp_ref = hf_logits(model, TOKENS), mtp_reference(model, mtp, TOKENS)
    for layout in [(2, 1, 1), (1, 2, 2)]:
        out = mcore_outputs(tmp_path / "td", TOKENS, layout)
        main = (out["logits"][..., :100] - reference).abs().max().item()
        nextn = (out["mtp_logits"][..., :100] - mtp_ref).abs().max().item()
        print(f"deepseek torch_dist at TP{layout[0]} PP{layout[1]} EP{layout[2]}: logits {main:.2e}, MTP {nextn:.2e}")
        assert main < 1e-4 and nextn < 1e-4
    convert_inprocess("core_ext", "hf", tmp_path / "td", tmp_path / "back", "--hf-config-dir", str(tmp_path / "hf"))
    assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "back"))


@pytest.mark.parametrize("flag", [["--naming", "mindspeed"], ["--noop-layers", "1"], ["--qlora-nf4"]])
def test_torch_dist_refuses_legacy_only_layouts(tmp_path, flag):
    make_hf_model("llama", tmp_path / "hf")
    result = convert_cli("--loader", "hf", "--saver", "core_ext", "--load-dir", str(tmp_path / "hf"),
                         "--save-dir", str(tmp_path / "td"), "--ckpt-format", "torch_dist", *flag)
    assert result.returncode != 0
    assert "--ckpt-format torch_dist cannot be combined with" in result.stderr
    assert not (tmp_path / "td").exists()
