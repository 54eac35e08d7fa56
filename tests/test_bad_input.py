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


def test_nan_warns_and_strict_fails(tmp_path, hf_dir):
    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    src = copy_model(hf_dir, tmp_path / "src", poison)
    warned = to_mcore(src, tmp_path / "out")
    assert warned.returncode == 0 and "warning:" in warned.stderr and "NaN/Inf" in warned.stderr
    strict = to_mcore(src, tmp_path / "out2", "--strict")
    assert_clean_failure(strict, "NaN/Inf", "mlp l0 weight V", save_dir=tmp_path / "out2")


def test_failure_after_rank_files_were_written_is_clean(tmp_path, hf_dir):
    """The first stage's rank files are complete and the second's open when the last layer fails."""
    last = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"] - 1

    def poison(t):
        t[f"model.layers.{last}.self_attn.o_proj.weight"][0, 0] = float("inf")
    src = copy_model(hf_dir, tmp_path / "src", poison)
    strict = to_mcore(src, tmp_path / "out", "--strict", "--target-pipeline-parallel-size", "2", "--target-tensor-parallel-size", "2")
    assert_clean_failure(strict, "NaN/Inf", save_dir=tmp_path / "out")
    assert "Fatal" not in strict.stderr and strict.returncode == 1, strict.stderr


def test_header_lying_about_sizes(tmp_path, hf_dir):
    import struct

    src = copy_model(hf_dir, tmp_path / "src")
    data = bytearray((src / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = "model.layers.0.mlp.up_proj.weight"
    header[name]["shape"] = [96, 65]  # claims more bytes than its offsets hold
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n
    (src / "model.safetensors").write_bytes(bytes(data[:8]) + raw + bytes(data[8 + n:]))
    assert_clean_failure(to_mcore(src, tmp_path / "out"), name, "does not match its shape", save_dir=tmp_path / "out")


def sharded_copy(src, dst):
    """Split an HF model into two shards with an index."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in half.items():
        save_file({k: tensors[k] for k in keys}, dst / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in half.items() for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst, tensors


def test_missing_shard_listed_in_index(tmp_path, hf_dir):
    src, _ = sharded_copy(hf_dir, tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    assert_clean_failure(to_mcore(src, tmp_path / "out"), "model-00002-of-00002.safetensors", "missing", save_dir=tmp_path / "out")


def test_duplicate_tensor_across_shards(tmp_path, hf_dir):
    src, tensors = sharded_copy(hf_dir, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    second = {k: tensors[k] for k, v in index["weight_map"].items() if v.startswith("model-00002")}
    save_file({**second, first: tensors[first]}, src / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    assert_clean_failure(to_mcore(src, tmp_path / "out"), first, "appears in both", save_dir=tmp_path / "out")


def test_wrong_dtype(tmp_path, hf_dir):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
    src = copy_model(hf_dir, tmp_path / "src", to_int)
    result = to_mcore(src, tmp_path / "out")
    assert_clean_failure(result, "model.norm.weight", "dtype", save_dir=tmp_path / "out")


def test_pickle_that_is_not_a_checkpoint_is_refused(tmp_path, hf_dir):
    ok = to_mcore(hf_dir, tmp_path / "mc")
    assert ok.returncode == 0
    f = next((tmp_path / "mc").glob("*/mp_rank_00/model_optim_rng.pt"))
    ckpt = torch.load(f, weights_only=False)
    ckpt["payload"] = subprocess_marker()
    torch.save(ckpt, f)
    result = convert_cli("--loader", "core_ext", "--saver", "hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"))
    assert_clean_failure(result, "refusing to unpickle", save_dir=tmp_path / "out")


class Marker:
    """A class a plain checkpoint never contains; unpickling it would run code from this module."""


def subprocess_marker():
    return Marker()


def test_fuzzed_headers_fail_cleanly(tmp_path, hf_dir):
    """Random byte flips in the safetensors header: either a clean ConversionError or a valid read."""
    import argparse
    import random
    import struct
    import time

    from ckpt_lib.engine import hf_loader
    from ckpt_lib.errors import ConversionError

    class Sink:
        def put(self, msg):
            pass

    src = copy_model(hf_dir, tmp_path / "src")
    original = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", original[:8])
    rng = random.Random(1)
    args = argparse.Namespace(load_dir=str(src), model_type_hf=None, true_vocab_size=None, strict=False)
    deadline, tries, clean = time.monotonic() + 15, 0, 0
    while time.monotonic() < deadline and tries < 400:
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, 8 + n)] = rng.randrange(256)
        (src / "model.safetensors").write_bytes(bytes(data))
        tries += 1
        try:
            hf_loader.load(Sink(), args)
        except ConversionError:
            clean += 1
    assert tries >= 50 and clean > 0


def test_training_checkpoint_with_rng_state_is_read(tmp_path, hf_dir):
    """Megatron-LM's training checkpoints pickle numpy's RNG state in `rng_state`: admitted (inert data)."""
    import random

    import numpy as np

    assert to_mcore(hf_dir, tmp_path / "mc").returncode == 0
    f = next((tmp_path / "mc").glob("*/mp_rank_00/model_optim_rng.pt"))
    ckpt = torch.load(f, weights_only=False)
    ckpt["rng_state"] = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                          "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]
    torch.save(ckpt, f)
    result = convert_cli("--loader", "core_ext", "--saver", "hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
