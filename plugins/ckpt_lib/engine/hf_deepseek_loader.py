"""HuggingFace DeepSeek-V3 (bf16 or fp32) -> protocol: MLA, MoE (experts streamed in bounded
messages), and the MTP layer stored as layer `num_hidden_layers`. The configs of the same layout are read
too: Kimi-K2 (`model_type` kimi_k2), Moonlight (`q_lora_rank` null) and DeepSeek-V2 / V2-Lite (`model_type`
deepseek_v2, see families/deepseek_v2.py); `loader_hf` hands these model types to this loader.

FP8 releases (float8_e4m3fn weights with `*_weight_scale_inv` block scales, config.json
`quantization_config`) are read directly: each weight is dequantized while it streams (see `fp8`),
to the saver's `--params-dtype` when given, else to the dtype of the checkpoint's unquantized weights
(bf16 in DeepSeek's releases), rounded once as DeepSeek's `fp8_cast_bf16.py` does.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..families import deepseek, deepseek_v2
from ..io import fp8
from ..io.safetensors_io import SafetensorsSource
from ..layout.pipeline import parse_layer_list
from ..transport import protocol as P
from ..transport.spec import ModelSpec
from .hf_loader import (
    add_latent_norm_eps,
    add_strict,
    check_copy,
    deepseek_plan,
    qwen3_moe_experts,
    read_config,
    stream,
    validate,
)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--num-layers", type=int, default=None,
                       help="Layers without MTP, noop layers included (DeepSeek-V3: 61; default: from config.json)")
    group.add_argument("--first-k-dense-replace", type=int, default=None,
                       help="Dense layers before the MoE layers, at most 3 (default: from config.json)")
    group.add_argument("--mtp-num-layers", "--num-nextn-predict-layers", dest="mtp_num_layers", type=int, default=0,
                       help="MTP layers to convert: 0 (skip the MTP layer) or 1 (default 0, as in the seeds)")
    group.add_argument("--noop-layers", type=str, default=None,
                       help="Noop layer indices in the padded numbering, e.g. 61,62 (exclusive with --num-layer-list)")
    group.add_argument("--experts-per-message", type=int, default=8,
                       help="Routed experts per queue message (bounds the memory of one message)")
    add_latent_norm_eps(group)
    add_strict(group)


def metadata(cfg: dict[str, Any], dtype: Any, args: argparse.Namespace) -> ModelSpec:
    """The model spec of an MLA config by its transformers class, after refusing what megatron-core cannot compute."""
    deepseek.check_hf_config(cfg, getattr(args, "accept_latent_norm_eps", False))
    if cfg.get("model_type") in deepseek.V2_MODEL_TYPES:
        if getattr(args, "mtp_num_layers", 0):
            raise ConversionError("--mtp-num-layers: DeepSeek-V2 has no MTP layer")
        return deepseek_v2.metadata_from_hf(cfg, dtype)
    deepseek.check_hf_router(cfg)
    return deepseek.metadata_from_hf(cfg, dtype, getattr(args, "mtp_num_layers", None) or 0)


def load(queue: Any, args: argparse.Namespace) -> None:
    load_dir = Path(args.load_dir)
    cfg = read_config(load_dir)
    if cfg.get("model_type") not in (*deepseek.V3_MODEL_TYPES, *deepseek.V2_MODEL_TYPES, None):
        raise ConversionError(f"config.json: model_type {cfg.get('model_type')!r} is not one of "
                              f"{', '.join(deepseek.V3_MODEL_TYPES + deepseek.V2_MODEL_TYPES)}")
    raw = SafetensorsSource.from_dir(load_dir)
    embed = "model.embed_tokens.weight"
    if embed not in raw:
        raise ConversionError(f"tensor {embed!r} is missing from the checkpoint")
    # FP8 weights are rounded once, to what the saver writes: its --params-dtype, else the source's dtype
    dtype = P.DTYPES[args.params_dtype] if getattr(args, "params_dtype", None) else raw.dtype(embed)
    source = fp8.open_dequantized(raw, cfg, dtype)
    # loader_hf hands MLA configs over without this loader's own options (its --mtp-num-layers None: GLM-4.5's
    # "the layers held"): their defaults
    mtp = getattr(args, "mtp_num_layers", None) or 0
    per_message = getattr(args, "experts_per_message", 8)
    if mtp not in (0, 1):
        raise ConversionError(f"--mtp-num-layers {mtp}: only 0 or 1 is supported")
    first_k = getattr(args, "first_k_dense_replace", None)
    if first_k is not None and first_k != cfg.get("first_k_dense_replace"):
        raise ConversionError(f"--first-k-dense-replace {first_k} disagrees with config.json "
                              f"first_k_dense_replace {cfg.get('first_k_dense_replace')}")
    noop = parse_layer_list(getattr(args, "noop_layers", None)) or []
    num_layers = getattr(args, "num_layers", None)
    if num_layers is not None and num_layers != cfg.get("num_hidden_layers", 0) + len(noop):
        raise ConversionError(f"--num-layers {num_layers} should be config.json num_hidden_layers "
                              f"{cfg.get('num_hidden_layers')} + {len(noop)} noop layers")
    if per_message < 1:
        raise ConversionError("--experts-per-message must be >= 1")
    md = metadata(cfg, source.dtype(embed), args)
    if isinstance(source, fp8.Fp8Source):
        # kept in hf_config (it travels into Megatron checkpoints) for a saver that writes FP8 again;
        # saver_hf writes the dequantized weights and leaves it out of config.json
        md = dataclasses.replace(md, source_quantization=source.quantization)
        print(f"loader_hf_deepseek3: FP8 checkpoint ({len(source.scales)} block-scaled weights, blocks of "
              f"{list(source.block)}): dequantized to {str(dtype).removeprefix('torch.')} while reading")
    else:
        stale = "quantization_config"  # a dequantized copy's stale setting
        md = dataclasses.replace(md, hf_config={k: v for k, v in (md.hf_config or {}).items() if k != stale})
    if mtp and (cfg.get("num_nextn_predict_layers") or 0) < 1:
        raise ConversionError("--mtp-num-layers 1, but config.json has num_nextn_predict_layers 0")
    plan = deepseek_plan(md, per_message, experts=qwen3_moe_experts(source, md))  # per-expert or fused [E, ...] on disk
    mtp_prefix = f"model.layers.{md.num_layers}."
    mtp_names = {n for n in source.names() if n.startswith(mtp_prefix)}
    copies = {mtp_prefix + c: original for c, original in deepseek.MTP_COPIES.items()}
    ignored = (mtp_names if not mtp else {c for c in copies if c in source})
    validate(source, md, plan, ignored)
    if mtp:
        for copy, original in copies.items():
            check_copy(source, copy, original)
    elif mtp_names:
        scales = sum(n in getattr(source, "scales", {}) for n in mtp_names)
        with_scales = f" (and the FP8 scales of {scales})" if scales else ""
        print(f"loader_hf_deepseek3: skipping the {len(mtp_names)} MTP tensors{with_scales} of layer {md.num_layers} "
              "(--mtp-num-layers 0)")
    stream(queue, source, md, plan, "loader_hf_deepseek3", args)
