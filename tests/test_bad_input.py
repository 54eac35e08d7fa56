"""Bad input through the real command line: one clear error line, non-zero exit, no partial output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from util import convert_cli, make_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    make_hf_model("llama", path)
    return path


def copy_model(src, dst, edit=None):
    """Copy an HF dir, optionally editing its tensors dict."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def assert_clean_failure(result, *needles, save_dir=None):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    if save_dir is not None:
        assert not save_dir.exists() or not any(save_dir.iterdir())
        assert not [p for p in save_dir.parent.iterdir() if ".partial-" in p.name]


def to_mcore(load_dir, save_dir, *extra):
    return convert_cli("--loader", "hf", "--saver", "core_ext", "--load-dir", str(load_dir), "--save-dir", str(save_dir),
                       "--saver-transformer-impl", "local", *extra)


def test_missing_config(tmp_path, hf_dir):
    src = copy_model(hf_dir, tmp_path / "src")
    (src / "config.json").unlink()
    assert_clean_failure(to_mcore(src, tmp_path / "out"), "config.json", save_dir=tmp_path / "out")


def test_missing_tensor(tmp_path, hf_dir):
    src = copy_model(hf_dir, tmp_path / "src", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    assert_clean_failure(to_mcore(src, tmp_path / "out"), "model.layers.2.mlp.up_proj.weight", save_dir=tmp_path / "out")


def test_wrong_shape(tmp_path, hf_dir):
    def shrink(t):
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    src = copy_model(hf_dir, tmp_path / "src", shrink)
    assert_clean_failure(to_mcore(src, tmp_path / "out"), "mlp l1 weight", "[64, 95]", save_dir=tmp_path / "out")


def test_unmapped_tensor(tmp_path, hf_dir):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    src = copy_model(hf_dir, tmp_path / "src", add)
    assert_clean_failure(to_mcore(src, tmp_path / "out"), "unmapped", "rotary_emb.inv_freq", save_dir=tmp_path / "out")


def test_truncated_safetensors(tmp_path, hf_dir):
    src = copy_model(hf_dir, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert_clean_failure(to_mcore(src, tmp_path / "out"), "model.safetensors", "truncated", save_dir=tmp_path / "out")


def test_config_disagrees_with_tensors(tmp_path, hf_dir):
    src = copy_model(hf_dir, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(to_mcore(src, tmp_path / "out"), "shape", save_dir=tmp_path / "out")


def test_tp_not_dividing_heads(tmp_path, hf_dir):
    result = to_mcore(hf_dir, tmp_path / "out", "--target-tensor-parallel-size", "3")
    assert_clean_failure(result, "--target-tensor-parallel-size 3", "num_attention_heads 4", save_dir=tmp_path / "out")


def test_layer_list_not_summing(tmp_path, hf_dir):
    result = to_mcore(hf_dir, tmp_path / "out", "--target-pipeline-parallel-size", "2", "--num-layer-list", "1,2")
    assert_clean_failure(result, "--num-layer-list", "sums to 3", save_dir=tmp_path / "out")


def test_vpp_with_layer_list_refused(tmp_path, hf_dir):
    result = to_mcore(hf_dir, tmp_path / "out", "--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3",
                      "--num-layers-per-virtual-pipeline-stage", "1")
    assert_clean_failure(result, "cannot be used together", save_dir=tmp_path / "out")


def test_non_empty_save_dir_needs_overwrite(tmp_path, hf_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = to_mcore(hf_dir, out)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    ok = to_mcore(hf_dir, out, "--overwrite")
    assert ok.returncode == 0, ok.stderr
    assert not (out / "precious.txt").exists() and (out / "latest_checkpointed_iteration.txt").exists()


def test_success_prints_summary(tmp_path, hf_dir):
    result = to_mcore(hf_dir, tmp_path / "out", "--target-tensor-parallel-size", "2")
    assert result.returncode == 0, result.stderr
    assert "saver_core_ext: wrote 2 files" in result.stdout
