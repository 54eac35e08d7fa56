"""Qwen3-MoE in HuggingFace naming (GQA with q/k norm, softmax top-k router, routed experts only) <-> protocol.

transformers 5 holds the experts fused in memory (`mlp.experts.gate_up_proj` / `down_proj`) but
saves them per expert (`mlp.experts.{e}.gate_proj.weight`, ...), the DeepSeek-V3 names, so
`deepseek.EXPERTS` serves both. No shared expert, no router bias.
"""

from __future__ import annotations

import argparse

from .. import protocol as P
from ..errors import ConversionError
from . import Relation, Section, dense

ATTENTION = tuple(r for r in dense.LAYER.relations if not r.source[0].startswith("mlp."))
LAYER = Section(None, dense.LAYER.prefix, ATTENTION + (Relation(("mlp.gate.weight",), (P.ROUTER_W,)),))


def check(md: argparse.Namespace) -> None:
    """An MoE model without MLA is written as Qwen3-MoE, which has nowhere to put these."""
    extra = [f for f in ("moe_shared_expert_intermediate_size", "moe_router_enable_expert_bias") if getattr(md, f, None)]
    if extra:
        raise ConversionError(f"MoE without MLA is saved as Qwen3-MoE, which has no {' / '.join(extra)}")
