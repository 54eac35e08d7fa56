"""YaRN RoPE scaling of MLA models (DeepSeek-V3): HF config <-> model spec <-> Megatron `args`.

`ModelSpec.rope_scaling` is None (plain RoPE) or a `RopeScaling` (on the queue a dict with the keys of
`YARN_KEYS`), in megatron-core's meaning: `factor` (MLATransformerConfig.rotary_scaling_factor), `mscale` and
`mscale_all_dim` (the cos/sin factor is get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim),
the MLA softmax scale is multiplied by get_mscale(factor, mscale_all_dim)^2), `original_max_position_embeddings`,
`beta_fast`, `beta_slow` (the correction range, rounded to integers as both libraries do).

Where the releases read them (verified in the sources):
- megatron-core 0.12.1 MLATransformerConfig: rope_type, rotary_scaling_factor, mscale, mscale_all_dim,
  beta_fast, beta_slow, and `max_position_embeddings` as YaRN's ORIGINAL length (Megatron-LM core_r0.12 fills it
  from --max-position-embeddings); its softmax scale uses `mscale`, not `mscale_all_dim`.
- megatron-core 0.16.1 / 0.19.2: the same with `original_max_position_embeddings`; softmax scale from mscale_all_dim.
- Megatron-LM builds the config from every `args` attribute named like a config field; its command line has
  --rotary-scaling-factor, --mscale, --mscale-all-dim (default 1.0 in core_r0.12.0, 0.0 in core_r0.19.0 / main),
  --rope-type (core_r0.19.0 / main), and --yarn-original-max-position-embeddings / --yarn-beta-fast /
  --yarn-beta-slow (core_r0.19.0 / main; used by non-MLA YaRN only). `--use-checkpoint-args` copies none of them.
- MindSpeed-LLM: --rope-scaling-type yarn and rope_scaling_{factor,mscale,mscale_all_dim,beta_fast,beta_slow,
  original_max_position_embeddings}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from ..errors import ConversionError
from ..transport.spec import ModelSpec, RopeScaling

YARN_KEYS = ("factor", "mscale", "mscale_all_dim", "original_max_position_embeddings", "beta_fast", "beta_slow")
# MLATransformerConfig's values of the correction range (no Megatron-LM flag sets them for MLA).
CONFIG_DEFAULTS = {"original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}
# megatron-core releases before this one name YaRN's original length `max_position_embeddings` and scale the
# MLA softmax by `mscale` (0.12.1); 0.16.1 is the first release verified with the new names.
ORIGINAL_FIELD_SINCE = (0, 16)


def get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_dict(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """config.json's RoPE parameters: `rope_parameters` (transformers 5) or `rope_scaling` (the releases)."""
    for field in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(field), dict):
            return field, cfg[field]
    return "rope_scaling", {}


def from_hf(cfg: dict[str, Any], mla: bool) -> RopeScaling | None:
    """The spec's `rope_scaling` for a config.json; what megatron-core cannot express is one error naming the field."""
    field, params = _rope_dict(cfg)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "yarn" or not mla:
        raise ConversionError(f"config.json {field}.rope_type {kind!r}: megatron-core expresses only default RoPE"
                              + (" and YaRN (MLA)" if mla else " for this family (YaRN only with MLA)")
                              + "; refusing rather than converting to other rotary frequencies")
    original = params.get("original_max_position_embeddings")
    if not original:
        raise ConversionError(f"config.json {field}.original_max_position_embeddings is missing (needed by YaRN)")
    factor = params.get("factor") or cfg.get("max_position_embeddings", 0) / original  # transformers' fallback
    if params.get("attention_factor") is not None:
        raise ConversionError(f"config.json {field}.attention_factor: an explicit YaRN attention factor has no "
                              "megatron-core equivalent (it derives it from factor, mscale and mscale_all_dim)")
    if params.get("truncate", True) is not True:
        raise ConversionError(f"config.json {field}.truncate false: megatron-core's MLA rounds YaRN's correction range")
    mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not all_dim:  # transformers: cos/sin by get_mscale(factor), softmax unscaled = megatron mscale 1, all_dim 0
        mscale, all_dim = 1.0, 0.0
    elif not mscale:
        raise ConversionError(f"config.json {field}.mscale missing or 0 with mscale_all_dim {all_dim}: transformers then "
                              "scales cos/sin by get_mscale(factor) alone, which megatron-core cannot express")
    return RopeScaling(factor=float(factor), mscale=float(mscale), mscale_all_dim=float(all_dim),
                       original_max_position_embeddings=int(original),
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1))


def to_hf(rs: RopeScaling | None) -> dict[str, Any] | None:
    """config.json `rope_scaling` in DeepSeek-V3's release form (transformers 5 reads it as rope_parameters)."""
    if rs is None:
        return None
    out: dict[str, Any] = {"type": "yarn", **dataclasses.asdict(rs)}
    if out["factor"] == int(out["factor"]):
        out["factor"] = int(out["factor"])
    return out


def write_args(args: argparse.Namespace, md: ModelSpec, naming: str) -> None:
    """Every name a release reads, explicitly (plain RoPE: rope_type 'rope', factor 1)."""
    rs = md.rope_scaling
    values = dataclasses.asdict(rs) if rs else {"factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0, **CONFIG_DEFAULTS}
    args.rope_type = "yarn" if rs else "rope"
    args.rotary_scaling_factor = values["factor"]
    args.mscale, args.mscale_all_dim = values["mscale"], values["mscale_all_dim"]
    for name in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
        setattr(args, name, values[name])  # MLATransformerConfig's field names (0.16+)
        setattr(args, "yarn_" + name, values[name])  # Megatron-LM core_r0.19.0 / main --yarn-* names
    if naming == "mindspeed":
        args.rope_scaling_type = "yarn" if rs else None
        for name in YARN_KEYS:
            setattr(args, "rope_scaling_" + name, values[name])


def from_args(a: argparse.Namespace) -> RopeScaling | None:
    """The spec's `rope_scaling` from a checkpoint's `args` (ours, Megatron-LM's or MindSpeed-LLM's names). Without
    `rope_type` MLA is YaRN (MLATransformerConfig's default); a factor of 1 is plain RoPE."""
    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            if getattr(a, name, None) is not None:
                return getattr(a, name)
        return default

    if getattr(a, "rope_scaling_type", None) == "yarn" and getattr(a, "rope_type", None) is None:  # MindSpeed-LLM's own
        rs = {k: first("rope_scaling_" + k) for k in YARN_KEYS}
        rs = {k: CONFIG_DEFAULTS.get(k) if v is None else v for k, v in rs.items()}
    else:
        if (getattr(a, "rope_type", None) or "yarn") != "yarn":
            return None
        rs = {"factor": first("rotary_scaling_factor", default=1.0), "mscale": first("mscale", default=1.0),
              "mscale_all_dim": first("mscale_all_dim", default=0.0)}
        for name in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
            rs[name] = first(name, "yarn_" + name, default=CONFIG_DEFAULTS[name])
    if float(rs["factor"]) == 1.0:
        return None
    return RopeScaling(**{k: int(v) if k == "original_max_position_embeddings" else float(v) for k, v in rs.items()})


def check_target(md: ModelSpec, version: tuple[int, int]) -> None:
    """What the target release's MLA cannot compute is refused before anything is written."""
    rs = md.rope_scaling
    if rs and version < ORIGINAL_FIELD_SINCE and rs.mscale != rs.mscale_all_dim:
        raise ConversionError(f"rope_scaling.mscale {rs.mscale} != mscale_all_dim {rs.mscale_all_dim}: megatron-core "
                              f"{version[0]}.{version[1]} scales the MLA softmax by mscale, transformers by mscale_all_dim "
                              "(use --target-mcore-version 0.16 or later)")


def training_flags(md: ModelSpec, version: tuple[int, int]) -> tuple[list[str], list[str]]:
    """(flags the Megatron-LM training command must pass, warnings): --use-checkpoint-args copies none of these."""
    rs = md.rope_scaling
    if md.mla is None:
        return [], []
    if rs is None:  # MLA defaults to YaRN; factor 1 is plain RoPE in every release
        flags = ["--rotary-scaling-factor", "1.0"] + (["--rope-type", "rope"] if version >= (0, 17) else [])
        return flags, []
    flags = ["--rotary-scaling-factor", f"{rs.factor:g}", "--mscale", f"{rs.mscale:g}",
             "--mscale-all-dim", f"{rs.mscale_all_dim:g}"]
    if version >= (0, 17):
        flags = ["--rope-type", "yarn", *flags]
    warnings = []
    if version < ORIGINAL_FIELD_SINCE:  # core_r0.12's MLA takes --max-position-embeddings as YaRN's original length
        flags += ["--max-position-embeddings", str(rs.original_max_position_embeddings)]
    values = dataclasses.asdict(rs)
    odd = [f"{k} {values[k]:g}" for k in ("original_max_position_embeddings", "beta_fast", "beta_slow") if values[k] != CONFIG_DEFAULTS[k]
           and not (k == "original_max_position_embeddings" and version < ORIGINAL_FIELD_SINCE)]
    if odd:
        warnings.append(f"YaRN {', '.join(odd)} differ from MLATransformerConfig's defaults (4096, 32, 1), and Megatron-LM has "
                        "no flag that sets them for MLA: they are in args under the config's field names; set them in the "
                        "MLATransformerConfig your training builds")
    return flags, warnings
