"""QLoRA NF4 base weights in bitsandbytes' layout (`--qlora-nf4`), and their dequantization.

A quantized linear weight `X.weight` is stored as bitsandbytes' Linear4bit saves it: the packed
uint8 data under `X.weight` and its quant state under `X.weight.absmax`, `X.weight.quant_map` and
`X.weight.quant_state.bitsandbytes__nf4` (plus `nested_*` entries with double quantization).
Each TP shard is quantized on its own, as the rank that trains on it would. bitsandbytes is only
needed when these options are used.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ConversionError

LINEAR = re.compile(r"\.(linear_(qkv|proj|fc1|fc2|q_proj|q_down_proj|q_up_proj|kv_down_proj|kv_up_proj))\.weight\d*$")
STATE_MARKER = ".quant_state.bitsandbytes__nf4"
BLOCKSIZE = 64


def _bnb() -> Any:
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise ConversionError("NF4 (QLoRA) weights need bitsandbytes: pip install bitsandbytes") from None
    return F


def quantize_nf4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every linear weight of one chunk by its NF4 packing and quant state."""
    F = None
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not LINEAR.search(name) or t.dim() != 2:
            out[name] = t
            continue
        F = F or _bnb()
        packed, quant_state = F.quantize_4bit(t, quant_type="nf4", blocksize=BLOCKSIZE)
        out[name] = packed
        out.update({f"{name}.{key}": value for key, value in quant_state.as_dict(packed=True).items()})
    return out


def dequantize_nf4(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `quantize_nf4` (exactly bitsandbytes' dequantization), detected per weight."""
    weights = [n[: -len(STATE_MARKER)] for n in state if n.endswith(STATE_MARKER)]
    if not weights:
        return state
    F = _bnb()
    out = dict(state)
    for name in weights:
        prefix = name + "."
        stats = {k[len(prefix):]: out.pop(k) for k in [k for k in out if k.startswith(prefix)]}
        quant_state = F.QuantState.from_dict(stats, device=torch.device("cpu"))
        out[name] = F.dequantize_4bit(out[name], quant_state)
    return out
