"""The HF MoE families with a softmax router and no MLA (Qwen3-MoE, Qwen2-MoE, Mixtral), one module each with
the same interface: `MODEL_TYPE`, `EXPERT_SIZE`, `metadata_from_hf` and `hf_tables` (read), `holds`, `check`,
`layer_section`, `EXPERTS`, `check_config` and `hf_config_from_metadata` (write).

The HF loader picks the family by config.json's `model_type`; the HF saver by the family the loader recorded
(`md.hf_model_type`, in Megatron's args), else the source config's model_type, else the checkpoint's own
flags (q/k norm, qkv bias, shared expert and its gate, router), which Megatron's args carry: a checkpoint
goes back to its family's tensor names and config.json whether or not it recorded where it came from.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ConversionError
from ..transport.spec import ModelSpec
from . import mixtral, qwen2_moe, qwen3_moe

FAMILIES: dict[str, ModuleType] = {f.MODEL_TYPE: f for f in (qwen3_moe, qwen2_moe, mixtral)}


def for_metadata(md: ModelSpec) -> ModuleType:
    """The recorded family (whose `check` then holds the checkpoint to it), else the one family whose flags the
    checkpoint has, else one error line listing them."""
    recorded = md.hf_model_type or (md.hf_config or {}).get("model_type")
    if recorded in FAMILIES:
        return FAMILIES[recorded]
    held = [f for f in FAMILIES.values() if f.holds(md)]
    if len(held) == 1:
        return held[0]
    raise ConversionError("an MoE checkpoint without MLA is written as GLM-4.5 (sigmoid router with expert bias), Qwen3-MoE "
                          f"(q/k norm), Qwen2-MoE (gated shared expert) or Mixtral; this one ({qwen3_moe.flags(md)}) is none of them")
