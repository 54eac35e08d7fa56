"""DeepSeek-V3 FP8 releases read directly: block-scaled float8_e4m3fn weights dequantized while streaming,
bit-exact against DeepSeek's rule (fp32 weight x block scale, rounded once), checked before anything is written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from util import (
    ROOT,
    assert_same_tensors,
    convert_cli,
    convert_inprocess,
    make_deepseek_model,
    read_mcore_dir,
    read_safetensors_dir,
)

BLOCK = [16, 16]  # the release's is [128, 128]; 24-row/24-column projections give partial edge blocks
QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": BLOCK}
# The tensors the release stores FP8 (checked against DeepSeek-R1's tensor listing): every linear weight of the
# decoder layers and of the MTP layer's decoder block. Not: embeddings, lm_head, norms, the router's gate
# weight and e_score_correction_bias, the MTP layer's eh_proj, embed_tokens and shared_head (bf16 / fp32).
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight")
MTP = ["--mtp-num-layers", "1"]
LOCAL = ["--saver-transformer-impl", "local"]


def expand(scale, shape, block):
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def quantize(weight, block):
    """DeepSeek's weight_quant: scale = block amax / 448 (fp32), weight / scale cast to float8_e4m3fn."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float().abs()
    scale = padded.reshape(grid[0], block[0], grid[1], block[1]).amax((1, 3)) / 448
    return (weight.float() / expand(scale, weight.shape, block)).to(torch.float8_e4m3fn), scale


def dequantize(q, scale, block, dtype=torch.bfloat16):
    """DeepSeek's weight_dequant (kernel.py) / fp8_cast_bf16.py: fp32 product, rounded once."""
    return (q.float() * expand(scale, q.shape, block)).to(dtype)


def write_hf(directory, cfg, tensors, shard_of=lambda name: 0):
    """An HF directory in two shards with an index, as released (scales may sit in another shard)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    shards = [{}, {}]
    for name, t in tensors.items():
        shards[shard_of(name)][name] = t.contiguous()
    files = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    for f, part in zip(files, shards):
        save_file(part, directory / f, metadata={"format": "pt"})
    weight_map = {name: files[i] for i, part in enumerate(shards) for name in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


class Release:
    """A tiny DeepSeek-V3 in the release's FP8 form, and the same checkpoint dequantized by DeepSeek's rule."""

    def __init__(self, root):
        make_deepseek_model(root / "bf16", dtype=torch.bfloat16)
        original = read_safetensors_dir(root / "bf16")
        self.cfg = json.loads((root / "bf16" / "config.json").read_text())
        self.fp8, self.reference = {}, {}
        for name, t in original.items():
            if name.endswith("e_score_correction_bias"):
                t = t.float()  # as released
            if QUANTIZED.fullmatch(name):
                q, scale = quantize(t, BLOCK)
                self.fp8[name], self.fp8[name + "_scale_inv"] = q, scale
                self.reference[name] = dequantize(q, scale, BLOCK)
            else:
                self.fp8[name] = self.reference[name] = t
        self.quantized = [n for n in self.fp8 if n + "_scale_inv" in self.fp8]
        layer = re.compile(r"model\.layers\.(\d+)\.")
        # odd layers' scales in the other shard than their weights
        self.shard_of = lambda n: int(n.endswith("_scale_inv") and int(layer.match(n).group(1)) % 2 == 1)
        self.fp8_dir = self.write(root / "fp8", self.fp8)
        self.ref_dir = write_hf(root / "ref", self.cfg, self.reference)

    def write(self, directory, tensors, cfg=None):
        cfg = cfg if cfg is not None else {**self.cfg, "quantization_config": QUANTIZATION}
        return write_hf(directory, cfg, tensors, self.shard_of)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return Release(tmp_path_factory.mktemp("fp8"))


def test_release_layout(release):
    """What is quantized, like the release; partial edge blocks in both dimensions."""
    names = release.quantized
    assert len(names) == 5 * 5 + 3 + 4 * 3 * (8 + 1)  # 4 layers + MTP: MLA 5 each, dense MLP 3, MoE (8 + shared) x 3
    assert any(n.startswith("model.layers.4.mlp.experts.") for n in names)  # MTP layer
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.4.eh_proj.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.input_layernorm.weight"):
        assert kept in release.fp8 and kept not in names
    shapes = [release.fp8[n].shape for n in names]
    assert any(r % BLOCK[0] for r, _ in shapes) and any(c % BLOCK[1] for _, c in shapes)


LAYOUTS = {
    "tp2ep2": [*LOCAL, "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "pp2ep2": [*LOCAL, "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "mindspeed_gg_tp2ep2": ["--naming", "mindspeed", "--moe-grouped-gemm", "--mla-mm-split", "--target-tensor-parallel-size", "2",
                            "--target-expert-parallel-size", "2"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_to_mcore_equals_dequantized_conversion(tmp_path, release, layout):
    convert_inprocess("hf_deepseek3", "core_ext", release.fp8_dir, tmp_path / "fp8", *MTP, *LAYOUTS[layout])
    convert_inprocess("hf_deepseek3", "core_ext", release.ref_dir, tmp_path / "ref", *MTP, *LAYOUTS[layout])
    ours, expected = read_mcore_dir(tmp_path / "fp8"), read_mcore_dir(tmp_path / "ref")
    assert sorted(ours) == sorted(expected)
    for key in ours:
        assert_same_tensors(ours[key], expected[key])
    # the source's FP8 form is remembered (for a saver that writes FP8 again)
    ckpt = torch.load(next((tmp_path / "fp8").glob("*/mp_rank_*/model_optim_rng.pt")), weights_only=False)
    assert ckpt["args"].hf_config["quantization_config"]["weight_block_size"] == BLOCK


def test_fp8_to_hf_is_the_dequantized_reference(tmp_path, release):
    convert_inprocess("hf_deepseek3", "hf", release.fp8_dir, tmp_path / "hf", *MTP)
    assert_same_tensors(release.reference, read_safetensors_dir(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    # the same through a Megatron checkpoint, whose hf_config keeps the FP8 setting
    convert_inprocess("hf_deepseek3", "core_ext", release.fp8_dir, tmp_path / "mc", *MTP, *LAYOUTS["pp2ep2"])
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(release.reference, read_safetensors_dir(tmp_path / "back"))
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    from transformers import AutoModelForCausalLM  # a plain bf16 checkpoint to transformers

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[0].self_attn.q_b_proj.weight, release.reference["model.layers.0.self_attn.q_b_proj.weight"])


def run_verify(*argv):
    return subprocess.run([sys.executable, str(ROOT / "verify.py"), *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_workers_and_verify(tmp_path, release):
    """--workers 2 (the driver) writes the files of the dequantized checkpoint's conversion; verify.py compares an
    FP8 source against its conversion as dequantized, also at --params-dtype fp32 (rounded once, to fp32)."""
    flags = ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2", *LOCAL, *MTP]
    result = convert_cli("--loader", "hf_deepseek3", "--saver", "core_ext", "--load-dir", str(release.fp8_dir),
                         "--save-dir", str(tmp_path / "workers"), "--workers", "2", *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    convert_inprocess("hf_deepseek3", "core_ext", release.ref_dir, tmp_path / "ref", *flags)
    ours, expected = read_mcore_dir(tmp_path / "workers"), read_mcore_dir(tmp_path / "ref")
    assert sorted(ours) == sorted(expected)
    for key in ours:
        assert_same_tensors(ours[key], expected[key])

    convert_inprocess("hf_deepseek3", "core_ext", release.fp8_dir, tmp_path / "fp32", *flags, "--params-dtype", "fp32")
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    w = read_mcore_dir(tmp_path / "fp32")["mp_rank_00_001_001/model"]["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"]
    assert torch.equal(w, dequantize(release.fp8[name], release.fp8[name + "_scale_inv"], BLOCK, torch.float32))
    ok = run_verify("--source", release.fp8_dir, "--converted", tmp_path / "fp32", "--source-args", "--mtp-num-layers 1")
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stdout + ok.stderr


def test_negative_controls(tmp_path, release):
    """Other dequantizations differ from ours, and verify.py says so: transformers' rule (bf16 product,
    rounded twice) and a wrong block size."""
    convert_inprocess("hf_deepseek3", "hf", release.fp8_dir, tmp_path / "hf", *MTP)
    ours = read_safetensors_dir(tmp_path / "hf")
    wrong_block, bf16_product = dict(release.reference), dict(release.reference)
    for name in release.quantized:
        q, scale = release.fp8[name], release.fp8[name + "_scale_inv"]
        bf16_product[name] = q.to(torch.bfloat16) * expand(scale, q.shape, BLOCK).to(torch.bfloat16)
        # [32, 32] blocks: every 32 rows / columns share the scale of their first 16
        wide = expand(scale[::2, ::2], q.shape, [32, 32])
        wrong_block[name] = (q.float() * wide).to(torch.bfloat16)
    for other in (bf16_product, wrong_block):
        assert sum(not torch.equal(ours[n], other[n]) for n in release.quantized) > len(release.quantized) // 2
    bad = write_hf(tmp_path / "bf16_product", release.cfg, bf16_product)
    convert_inprocess("hf_deepseek3", "core_ext", bad, tmp_path / "mc", *MTP, *LOCAL)
    result = run_verify("--source", release.fp8_dir, "--converted", tmp_path / "mc", "--source-args", "--mtp-num-layers 1")
    assert result.returncode == 1 and "FAIL" in result.stdout, result.stdout + result.stderr


def _shrink_scale(t):
    name = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"
    t[name] = t[name][:, :1].clone()


def _scale_without_weight(t):
    t["model.layers.1.self_attn.q_c_proj.weight_scale_inv"] = torch.ones(2, 4)


def _scale_of_bf16_weight(t):
    t["model.layers.1.mlp.gate.weight_scale_inv"] = torch.ones(1, 4)


def _missing_scale(t):
    del t["model.layers.3.mlp.experts.7.up_proj.weight_scale_inv"]


def _e5m2_weight(t):
    name = "model.layers.2.self_attn.o_proj.weight"
    t[name] = t[name].float().to(torch.float8_e5m2)


def _config(**change):
    def edit(cfg):
        q = dict(cfg["quantization_config"])
        for key, value in change.items():
            if value is None:
                q.pop(key)
            else:
                q[key] = value
        cfg["quantization_config"] = q
    return edit


BAD = {
    "scale_shape": (_shrink_scale, None, ["model.layers.0.self_attn.q_b_proj.weight_scale_inv", "[6, 1]", "needs [6, 2]"]),
    "scale_without_weight": (_scale_without_weight, None, ["q_c_proj.weight_scale_inv", "has no weight"]),
    "scale_of_bf16_weight": (_scale_of_bf16_weight, None, ["model.layers.1.mlp.gate.weight_scale_inv", "not FP8"]),
    "fp8_without_scale": (_missing_scale, None, ["model.layers.3.mlp.experts.7.up_proj.weight", "has no scale tensor"]),
    "e5m2": (_e5m2_weight, None, ["model.layers.2.self_attn.o_proj.weight", "float8_e5m2"]),
    "no_quantization_config": (None, lambda cfg: cfg.pop("quantization_config"), ["no quantization_config"]),
    "no_block_size": (None, _config(weight_block_size=None), ["quantization_config.weight_block_size"]),
    "not_fp8": (None, _config(quant_method="awq"), ["quantization_config.quant_method", "'awq'"]),
    "not_e4m3": (None, _config(fmt="e5m2"), ["quantization_config.fmt", "'e5m2'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_input_fails_before_writing(tmp_path, release, case, capsys):
    edit_tensors, edit_config, needles = BAD[case]
    tensors, cfg = dict(release.fp8), {**release.cfg, "quantization_config": QUANTIZATION}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    src = release.write(tmp_path / "src", tensors, cfg)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert_inprocess("hf_deepseek3", "core_ext", src, tmp_path / "out", *MTP, *LOCAL)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_bad_fp8_input_through_the_command_line(tmp_path, release):
    from test_bad_input import assert_clean_failure

    tensors = dict(release.fp8)
    _shrink_scale(tensors)
    src = release.write(tmp_path / "src", tensors)
    result = convert_cli("--loader", "hf_deepseek3", "--saver", "hf", "--load-dir", str(src), "--save-dir", str(tmp_path / "out"))
    assert_clean_failure(result, "q_b_proj.weight_scale_inv", "weight_block_size", save_dir=tmp_path / "out")
