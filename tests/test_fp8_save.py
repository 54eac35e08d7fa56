"""saver_hf --save-fp8: DeepSeek-V3's FP8 release layout written from any source, by DeepSeek's weight_quant rule
(block amax / 448, fp32 division, round to nearest even), read back by our FP8 reader and by transformers."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from test_fp8 import BLOCK, QUANTIZED, Release, dequantize, quantize

from ckpt_lib.engine.hf_saver import fp8_block
from ckpt_lib.errors import ConversionError
from ckpt_lib.families import deepseek
from ckpt_lib.io import fp8
from util import DEEPSEEK_CONFIG, convert_inprocess, make_deepseek_model, make_hf_model, read_safetensors_dir

MTP = ["--mtp-num-layers", "1"]
LOCAL = ["--saver-transformer-impl", "local"]
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """bf16 tiny DeepSeek-V3 (MTP) -> mcore -> HF FP8 in blocks of 16 (24-row/-column projections: partial blocks),
    in several shards."""
    root = tmp_path_factory.mktemp("fp8save")
    make_deepseek_model(root / "bf16", dtype=torch.bfloat16)
    convert_inprocess("hf_deepseek3", "core_ext", root / "bf16", root / "mc", *MTP, *LOCAL)
    convert_inprocess("core_ext", "hf", root / "mc", root / "fp8", "--save-fp8", "--fp8-block-size", "16", "--max-shard-size", "100KB")
    return root


def half_step(x):
    """Half the e4m3 spacing at |x| (x = w / scale, |x| <= 448): 2^(e-4) for normals, 2^-10 below 2^-6."""
    e = torch.floor(torch.log2(x.abs().clamp(min=2.0**-6)))
    return torch.exp2(e - 4)


def test_fp8_layout_and_values(saved):
    src, out = read_safetensors_dir(saved / "bf16"), read_safetensors_dir(saved / "fp8")
    quantized = sorted(n for n in src if QUANTIZED.fullmatch(n))
    assert sorted(out) == sorted([*src, *(n + "_scale_inv" for n in quantized)])
    assert len(quantized) == 5 * 5 + 3 + 4 * 3 * (8 + 1)  # as the release (tests/test_fp8.py)
    shapes = [src[n].shape for n in quantized]
    assert any(r % 16 for r, _ in shapes) and any(c % 16 for _, c in shapes)
    for name in quantized:
        w, q, scale = src[name], out[name], out[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert list(scale.shape) == [-(-w.shape[0] // 16), -(-w.shape[1] // 16)], name
        # within half an e4m3 step of the bf16 weight, relative to its block's scale, and the reference's bytes exactly
        x = w.float() / expand(scale, w.shape)
        assert bool(((q.float() - x).abs() <= half_step(x)).all()), name
        ref_q, ref_scale = quantize(w, BLOCK)
        assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), name
        padded = torch.zeros(scale.shape[0] * 16, scale.shape[1] * 16)
        padded[:w.shape[0], :w.shape[1]] = q.float().abs()
        assert bool((padded.reshape(scale.shape[0], 16, scale.shape[1], 16).amax((1, 3)) == 448).all()), name  # amax -> 448
    for name in set(src) - set(quantized):  # bit-identical; the router bias as megatron-core keeps it (fp32, as released)
        expected = src[name].float() if name.endswith("e_score_correction_bias") else src[name]
        assert out[name].dtype == expected.dtype and torch.equal(out[name], expected), name
    index = json.loads((saved / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and all(index[n] == index[n + "_scale_inv"] for n in quantized)
    cfg = json.loads((saved / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [16, 16]}
    assert cfg["dtype"] == "bfloat16"
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(saved / "fp8").quantization_config["weight_block_size"] == [16, 16]
    # On CPU transformers 5.23 dequantizes FP8 checkpoints to bf16 while loading (fp32 product, as ours), but it takes
    # the block size from weight shape / scale grid: right for whole blocks only (24 columns / 2 -> blocks of 12)
    model = AutoModelForCausalLM.from_pretrained(saved / "fp8")
    state = model.state_dict()
    whole = [n for n in quantized if n in state and all(d % 16 == 0 for d in src[n].shape)]
    assert len(whole) > 10
    for name in whole:
        assert torch.equal(state[name], dequantize(out[name], out[name + "_scale_inv"], BLOCK)), name


def expand(scale, shape, block=(16, 16)):
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def test_reads_back_through_our_fp8_reader(saved, tmp_path):
    out = read_safetensors_dir(saved / "fp8")
    convert_inprocess("hf_deepseek3", "hf", saved / "fp8", tmp_path / "bf16", *MTP)
    back = read_safetensors_dir(tmp_path / "bf16")
    assert sorted(back) == sorted(n for n in out if not n.endswith("_scale_inv"))
    for name, t in back.items():
        expected = dequantize(out[name], out[name + "_scale_inv"], BLOCK) if name + "_scale_inv" in out else out[name]
        assert torch.equal(t, expected), name


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return Release(tmp_path_factory.mktemp("fp8release"))


def round_trip(release, tmp_path, tensors):
    """FP8 -> mcore (bf16) -> FP8 with the block size the source recorded; (bytes, scales) that differ, and the worst
    relative scale change."""
    src = release.write(tmp_path / "src", tensors)
    convert_inprocess("hf_deepseek3", "core_ext", src, tmp_path / "mc", *MTP, *LOCAL)
    convert_inprocess("core_ext", "hf", tmp_path / "mc", tmp_path / "back", "--save-fp8")
    out = read_safetensors_dir(tmp_path / "back")
    assert sorted(out) == sorted(tensors)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]["weight_block_size"] == BLOCK
    for name in tensors:
        if name not in release.quantized and not name.endswith("_scale_inv"):
            assert out[name].dtype == tensors[name].dtype and torch.equal(out[name], tensors[name]), name
    nbytes = nscales = 0
    worst = 0.0
    for name in release.quantized:
        nbytes += int((out[name].view(torch.uint8) != tensors[name].view(torch.uint8)).sum())
        a, b = tensors[name + "_scale_inv"], out[name + "_scale_inv"]
        nscales += int((a != b).sum())
        worst = max(worst, float(((b - a) / a).abs().max()))
    return nbytes, nscales, worst


def test_round_trip_fp8_bf16_fp8(release, tmp_path):
    """Measured: no byte and no scale differs. Why: each block holds an element at +-448 (its amax) and its scale is
    fl32(a / 448) of a bf16 amax a, so bf16(448 * s) = a and the new scale is the old one; every other element comes
    back as bf16(q * s) = q * s * (1 + e), |e| <= 2^-9, far from an e4m3 rounding boundary (>= 1/30 of q away, 1/14
    for subnormals), so it requantizes to q."""
    assert round_trip(release, tmp_path / "a", release.fp8) == (0, 0, 0.0)
    # Scales not of that form (e.g. from fp32 master weights): the amax comes back as bf16(448 * s), so the scale moves
    # by at most bf16's half step (2^-9) -- in every block here -- and the bytes still do not (q * (1 + 2^-8) rounds to q).
    moved = {n: t * (1 + 3 * 2**-12) if n.endswith("_scale_inv") else t for n, t in release.fp8.items()}
    nbytes, nscales, worst = round_trip(release, tmp_path / "b", moved)
    scales = sum(release.fp8[n + "_scale_inv"].numel() for n in release.quantized)
    assert nbytes == 0 and nscales == scales and 0 < worst <= 2**-9


def test_quantizer_rule_edges():
    """Partial blocks, an all-zero block (scale 1.0, zero bytes: the reference would give 0/0 = NaN), ties to even,
    and a non-finite weight refused."""
    torch.manual_seed(1)
    w = (torch.randn(40, 37) * 0.02).bfloat16()
    w[16:32, 16:32] = 0
    w[0, 0] = 0.5  # block (0, 0): scale 0.5 / 448, so x = w * 896 exactly
    w[1, 1:3] = torch.tensor([17 / 896, 19 / 896])  # 17 and 19: ties between 16/18 and 18/20 -> 16 and 20 (even)
    q, scale = fp8.quantize(w, (16, 16))
    ref_q, ref_scale = quantize(w, [16, 16])
    assert scale.shape == (3, 3) and scale[1, 1] == 1.0 and torch.equal(q[16:32, 16:32].float(), torch.zeros(16, 16))
    keep = torch.ones(40, 37, dtype=torch.bool)
    keep[16:32, 16:32] = False
    assert torch.isnan(ref_scale[1, 1] * 0 / 0) and torch.equal(q.view(torch.uint8)[keep], ref_q.view(torch.uint8)[keep])
    assert scale[0, 0] == torch.tensor(0.5) / 448 and q[1, 1:3].float().tolist() == [16.0, 20.0]
    # dequantized by our reader's table rule: within half a step
    deq = (E4M3_VALUES[q.view(torch.uint8).long()] * expand(scale, w.shape)).to(torch.bfloat16)
    s = expand(scale, w.shape)  # + half a bf16 step of the product rounded once
    assert bool(((deq.float() - w.float()).abs() <= half_step(w.float() / s) * s + w.float().abs() * 2**-8).all())
    w[3, 30] = float("inf")
    with pytest.raises(ConversionError, match="non-finite"):
        fp8.quantize(w, (16, 16))


def test_block_size_defaults():
    md = dataclasses.replace(deepseek.metadata_from_hf(DEEPSEEK_CONFIG, torch.float32, 0), hf_config={})
    args = argparse.Namespace(save_fp8=True, fp8_block_size=None)
    assert fp8_block(args, md) == (128, 128)
    md = dataclasses.replace(md, hf_config={"quantization_config": {"weight_block_size": [64, 64]}})
    assert fp8_block(args, md) == (64, 64)
    md = dataclasses.replace(md, source_quantization={"weight_block_size": [32, 32]})
    assert fp8_block(args, md) == (32, 32)
    assert fp8_block(argparse.Namespace(save_fp8=True, fp8_block_size=16), md) == (16, 16)
    assert fp8_block(argparse.Namespace(save_fp8=False, fp8_block_size=None), md) is None


def test_save_fp8_refused_for_llama(tmp_path, capsys):
    make_hf_model("llama", tmp_path / "llama", num_layers=2)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert_inprocess("hf", "hf", tmp_path / "llama", tmp_path / "out", "--save-fp8")
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--save-fp8" in errors[0] and "DeepSeek-V3" in errors[0], errors
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
