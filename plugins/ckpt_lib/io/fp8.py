"""Block-scaled FP8 checkpoints as DeepSeek releases them (V3, R1, V3.1), read dequantized.

Each quantized weight `<name>` is float8_e4m3fn with a float32 `<name>_scale_inv` of shape
[ceil(rows / B0), ceil(cols / B1)], B = config.json `quantization_config.weight_block_size`
(edge blocks are partial). DeepSeek's reference (inference/kernel.py `weight_dequant`, used by
fp8_cast_bf16.py) computes fp8 -> fp32, times its block's scale in fp32, rounded once to the output
dtype. Here that is done per block row, from the file straight into the loader's output buffer:
a block's 256 possible products are one small table (fp32 product, rounded once, exactly the
reference's values), and the block row is a table lookup of its bytes. No fp32 copy of a tensor
exists; besides the output, a tensor needs its scales, their tables and one block row of bytes and
indices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConversionError
from .safetensors_io import Pending, SafetensorsSource, empty_shared

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
# Every float8_e4m3fn value, exactly, in fp32 (bytes 0x7f and 0xff are NaN).
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def has_fp8(source: SafetensorsSource) -> str | None:
    """The first FP8 weight or scale tensor of a checkpoint, or None."""
    return next((n for n in source.names() if n.endswith(SCALE_SUFFIX) or source.dtype(n) in FP8_DTYPES), None)


def block_size(cfg: dict[str, Any], example: str) -> tuple[int, int]:
    """config.json's FP8 block size [rows, columns]; every other setting that changes the numbers refused."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict):
        raise ConversionError(f"FP8 checkpoint ({example}), but config.json has no quantization_config: "
                              "the block size of the scales is unknown")
    if q.get("quant_method") != "fp8":
        raise ConversionError(f"config.json quantization_config.quant_method is {q.get('quant_method')!r}, "
                              "not 'fp8' (DeepSeek's block-scaled FP8)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConversionError(f"config.json quantization_config.fmt is {q.get('fmt')!r}: only 'e4m3' is read")
    if q.get("scale_fmt") not in (None, "ue8m0"):  # V3.1's ue8m0 scales are stored as float32 powers of two
        raise ConversionError(f"config.json quantization_config.scale_fmt is {q.get('scale_fmt')!r}: not read")
    b = q.get("weight_block_size")
    if not (isinstance(b, list) and len(b) == 2 and all(type(x) is int and x > 0 for x in b)):
        raise ConversionError(f"config.json quantization_config.weight_block_size is {'missing' if b is None else repr(b)}, "
                              "expected [rows, columns] such as [128, 128]")
    return b[0], b[1]


def scale_grid(shape: Iterable[int], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


class Fp8Source:
    """A SafetensorsSource seen dequantized: FP8 weights read as `dtype`, their scales consumed with them
    (never listed). Every pairing, dtype and scale shape is checked when it is opened."""

    def __init__(self, source: SafetensorsSource, block: tuple[int, int], dtype: torch.dtype,
                 quantization: dict[str, Any]) -> None:
        self.source, self.block, self.out_dtype, self.quantization = source, block, dtype, dict(quantization)
        self.scales: dict[str, str] = {}  # weight -> its scale
        for name in source.names():
            if name.endswith(SCALE_SUFFIX):
                weight = name.removesuffix(SCALE_SUFFIX)
                if weight not in source:
                    raise ConversionError(f"scale tensor {name!r} has no weight {weight!r} in the checkpoint")
                if source.dtype(weight) not in FP8_DTYPES:
                    raise ConversionError(f"scale tensor {name!r} belongs to {weight!r}, which is {source.dtype(weight)}, not FP8")
            elif source.dtype(name) in FP8_DTYPES:
                self.scales[name] = self._check_pair(name)
        self._names = [n for n in source.names() if not n.endswith(SCALE_SUFFIX)]
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._index = torch.empty(0, dtype=torch.int32)

    def _check_pair(self, name: str) -> str:
        source, scale = self.source, name + SCALE_SUFFIX
        if source.dtype(name) != torch.float8_e4m3fn:
            raise ConversionError(f"tensor {name!r} is {source.dtype(name)}: only float8_e4m3fn (fmt e4m3) is read")
        if scale not in source:
            raise ConversionError(f"FP8 tensor {name!r} has no scale tensor {scale!r}")
        shape = source.shape(name)
        if len(shape) != 2:
            raise ConversionError(f"FP8 tensor {name!r} has shape {list(shape)}: block scales need a 2-D weight")
        if source.dtype(scale) != torch.float32:
            raise ConversionError(f"scale tensor {scale!r} is {source.dtype(scale)}, not float32")
        grid = scale_grid(shape, self.block)
        if tuple(source.shape(scale)) != grid:
            raise ConversionError(f"scale tensor {scale!r} has shape {list(source.shape(scale))}, but its weight {name!r} "
                                  f"{list(shape)} in blocks of {list(self.block)} (config.json quantization_config."
                                  f"weight_block_size) needs {list(grid)}")
        return scale

    # The SafetensorsSource interface, dequantized.
    def __contains__(self, name: str) -> bool:
        return name in self.source and not name.endswith(SCALE_SUFFIX)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.out_dtype if name in self.scales else self.source.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.scales:
            return self.source.get(name)
        return self.pending(name).load()

    def pending(self, name: str) -> Pending:
        if name not in self.scales:
            return self.source.pending(name)
        self.source.used.update((name, self.scales[name]))
        return Fp8Pending(self, name)

    def __getattr__(self, name: str) -> Any:  # used, unused(), nbytes(), files ...
        return getattr(self.source, name)

    def dequantize_into(self, name: str, dest: torch.Tensor) -> None:
        """Weight `name` dequantized into `dest` (its dtype `out_dtype`, its elements laid out row-major)."""
        rows, cols = self.source.shape(name)
        if dest.dtype != self.out_dtype or dest.numel() != rows * cols:
            raise ConversionError(f"tensor {name!r} ({list(self.source.shape(name))}) cannot be dequantized into "
                                  f"{dest.dtype} {list(dest.shape)}")
        in_place = dest.is_contiguous()  # else (a strided part of a join) through a temporary
        out = dest.view(rows, cols) if in_place else torch.empty(rows, cols, dtype=self.out_dtype)
        if rows and cols:
            self._dequantize(name, out)
        if not in_place:
            dest.copy_(out.view(dest.shape))

    def _dequantize(self, name: str, out: torch.Tensor) -> None:
        file = self.source.where[name]
        rows, cols = out.shape
        b0, b1 = self.block
        scale = self.source.where[self.scales[name]].get(self.scales[name])
        # [block rows, block columns, 256]: each block's every possible value, fp32 product rounded once
        tables = (E4M3_VALUES * scale.unsqueeze(-1)).to(self.out_dtype).reshape(scale.shape[0], -1)
        offsets = torch.arange(cols, dtype=torch.int32).div_(b1, rounding_mode="floor").mul_(256)
        if self._scratch.numel() < b0 * cols:
            self._scratch = torch.empty(b0 * cols, dtype=torch.uint8)
            self._index = torch.empty(b0 * cols, dtype=torch.int32)
        for i in range(scale.shape[0]):
            first, last = i * b0, min(rows, (i + 1) * b0)
            n = (last - first) * cols
            raw = self._scratch[:n]
            file._read(name, [memoryview(raw.numpy())], start=first * cols)
            index = self._index[:n].view(last - first, cols)
            torch.add(raw.view(last - first, cols), offsets, out=index)
            torch.index_select(tables[i], 0, index.view(-1), out=out[first:last].view(-1))


class Fp8Pending(Pending):
    """An FP8 weight not read yet; reading it dequantizes it into place (joins, stacked experts)."""

    def __init__(self, owner: Fp8Source, name: str) -> None:
        self.owner, self.name = owner, name
        self.file = owner.source.where[name]
        self.dtype = owner.out_dtype
        self.shape = torch.Size(owner.source.shape(name))

    def read_into(self, dest: torch.Tensor) -> None:
        self.owner.dequantize_into(self.name, dest)

    def load(self) -> torch.Tensor:
        out = empty_shared(self.shape, self.dtype)
        self.read_into(out)
        return out


def open_dequantized(source: SafetensorsSource, cfg: dict[str, Any], dtype: torch.dtype) -> SafetensorsSource | Fp8Source:
    """`source` itself when it holds no FP8 tensor, else its dequantized view (all checks done here)."""
    example = has_fp8(source)
    if example is None:
        return source
    block = block_size(cfg, example)
    return Fp8Source(source, block, dtype, cfg["quantization_config"])


# -- Writing FP8 (saver_hf --save-fp8) -------------------------------------------------------------------------

E4M3_MAX = 448.0
# The linear weights DeepSeek's release stores FP8 (decoder layers and the MTP layer's block): MLA projections (a
# plain q_proj too, for configs without q_lora_rank), dense MLP, shared and routed experts. Not: embeddings,
# lm_head, norms, the router (`mlp.gate.weight`, `e_score_correction_bias`), the MTP layer's eh_proj, embed_tokens
# and shared_head.
RELEASE_QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                               r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight")


def quantization_config(block: tuple[int, int]) -> dict[str, Any]:
    """config.json's quantization_config of DeepSeek's FP8 release, for blocks of `block`."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def recorded_block(source_quantization: dict[str, Any] | None, hf_config: dict[str, Any] | None) -> tuple[int, int] | None:
    """The block size of the FP8 checkpoint a conversion came from (read directly, or kept in hf_config)."""
    for q in (source_quantization, (hf_config or {}).get("quantization_config")):
        b = q.get("weight_block_size") if isinstance(q, dict) else None
        if isinstance(b, list) and len(b) == 2 and all(type(x) is int and x > 0 for x in b):
            return b[0], b[1]
    return None


class Fp8Weight:
    """A 2-D weight written as block-scaled float8_e4m3fn by DeepSeek's rule (inference/kernel.py `weight_quant`):
    per [B0, B1] block (edge blocks partial), scale = amax(|w|) / 448 in fp32, fp8 = w (in fp32) / scale, cast with
    round to nearest even. An all-zero block, which the reference turns into NaN (0 / 0), gets scale 1.0 and zero
    bytes, so that it dequantizes to exact zeros by any rule. A non-finite weight is an error.

    Nothing is computed when it is made: `chunks` quantizes one block row at a time as the writer asks for its
    bytes (its scales filled on the way), then `scale` (an `Fp8Scale`, written after it) hands out the scales.
    Besides the weight itself only one block row in fp32 and one in fp8 exist at a time."""

    dtype = torch.float8_e4m3fn

    def __init__(self, name: str, weight: torch.Tensor, block: tuple[int, int]) -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ConversionError(f"--save-fp8: {name!r} is {weight.dtype} {list(weight.shape)}, not a 2-D float weight")
        self.name, self.weight, self.block = name, weight, block
        self.shape = weight.shape
        self.scales = torch.empty(scale_grid(weight.shape, block), dtype=torch.float32, device=weight.device)  # meta in a dry run
        self.done = False
        self.scale = Fp8Scale(self)

    @property
    def nbytes(self) -> int:
        return self.weight.numel()

    def numel(self) -> int:
        return self.weight.numel()

    def detach(self) -> Fp8Weight:
        return self

    def chunks(self) -> Iterable[torch.Tensor]:
        rows, cols = self.shape
        b0, b1 = self.block
        grid_cols = self.scales.shape[1]
        magnitude = torch.empty(min(rows, b0), cols, dtype=torch.float32)
        padded = torch.zeros(grid_cols * b1, dtype=torch.float32)  # a column tail's padding never wins the max
        for i in range(self.scales.shape[0]):
            first, last = i * b0, min(rows, (i + 1) * b0)
            x = self.weight[first:last].to(torch.float32, copy=True)  # exact: bf16/fp16/fp32 -> fp32
            m = torch.abs(x, out=magnitude[:last - first])
            torch.amax(m, 0, out=padded[:cols])
            amax = padded.view(grid_cols, b1).amax(1)
            if not bool(torch.isfinite(amax).all()):
                raise ConversionError(f"--save-fp8: {self.name!r} has a non-finite value in block row {i}: not quantized")
            scale = self.scales[i]
            torch.div(amax, E4M3_MAX, out=scale)
            scale.masked_fill_(amax == 0, 1.0)
            x.div_(scale.repeat_interleave(b1)[:cols])
            # round to nearest even; |x| <= 448 (torch saturates, as the GPU's satfinite cast does)
            yield x.to(torch.float8_e4m3fn)
        self.done = True


class Fp8Scale:
    """A weight's `_scale_inv` [ceil(rows / B0), ceil(cols / B1)] float32, known once its weight is written."""

    dtype = torch.float32

    def __init__(self, weight: Fp8Weight) -> None:
        self.weight = weight
        self.shape = weight.scales.shape
        self.nbytes = weight.scales.nbytes

    def numel(self) -> int:
        return self.weight.scales.numel()

    def detach(self) -> Fp8Scale:
        return self

    def chunks(self) -> Iterable[torch.Tensor]:
        if not self.weight.done:
            raise RuntimeError(f"{self.weight.name}: its scales are written before the weight")
        yield self.weight.scales


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole weight quantized at once (tests, benchmarks): (float8_e4m3fn weight, float32 scales)."""
    w = Fp8Weight("weight", weight, block)
    q = torch.cat([c.clone() for c in w.chunks()]) if weight.numel() else torch.empty(weight.shape, dtype=w.dtype)
    return q, w.scales
