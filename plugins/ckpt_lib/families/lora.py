"""LoRA adapters in MindSpeed-LLM checkpoints: extraction, TP gathering and merging.

Keys (REFERENCE §6): `<module>.lora_A.default.weight`, `<module>.lora_B.default.weight`; when the
base weights are saved too, the base becomes `<module>.base_layer.weight`. Tensor-parallel rules:
for a column-parallel base (linear_qkv, linear_fc1, up projections) lora_A is replicated and
lora_B split by rows like the base (a gated fc1's lora_B rows follow [gate_i; up_i] per rank);
for a row-parallel base (linear_proj, linear_fc2) lora_A is split by columns and lora_B replicated.

Merging happens on the gathered (TP1) tensors, W + scale * B @ A in fp32 rounded once to the
base dtype, so a merged checkpoint is identical whatever the source or target layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConversionError
from ..layout.sharding import COLUMN, GATED, REPLICATED, ROW, gather
from ..transport.spec import ModelSpec

LORA_A, LORA_B = "lora A", "lora B"  # protocol key suffixes when adapters travel unmerged
ADAPTER = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")
BASE = ".base_layer."


@dataclass
class LoraOptions:
    rank: int | None
    alpha: float | None
    targets: list[str] | None
    rslora: bool

    def scale(self, r: int) -> float:
        alpha = self.alpha if self.alpha is not None else r
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def split_adapters(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Base tensors under their plain names, and {module: {"A": shard, "B": shard}}."""
    base: dict[str, Any] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = ADAPTER.match(name)
        if m:
            adapters.setdefault(m[1], {})[m[2]] = t
        else:
            base[name.replace(BASE, ".")] = t
    for module, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            raise ConversionError(f"LoRA adapter {module} lacks lora_{'B' if 'A' in pair else 'A'}")
    return base, adapters


def gather_adapter(shards: list[dict[str, torch.Tensor]], rule: str, module: str) -> tuple[torch.Tensor, Any]:
    """Full (A, B) from per-TP-rank adapter shards; B is a (gate, up) pair for a gated base."""
    a_shards, b_shards = [s["A"] for s in shards], [s["B"] for s in shards]
    if rule in (COLUMN, GATED):
        return a_shards[0], gather(b_shards, rule, module + ".lora_B")
    if rule == ROW:
        return gather(a_shards, ROW, module + ".lora_A"), b_shards[0]
    if rule == REPLICATED:  # a linear kept whole on every TP rank (MLA down projections, TE / MindSpeed)
        return a_shards[0], b_shards[0]
    raise ConversionError(f"LoRA on {module} (a {rule} parameter) is not supported")


def split_fused_down(adapters: dict[str, dict[str, torch.Tensor]], md: ModelSpec) -> dict[str, dict[str, torch.Tensor]]:
    """MindSpeed-LLM's fused MLA down projection `linear_qkv` = [q_down; kv_down]: its adapter shares
    lora_A and splits lora_B's rows the same way."""
    if md.mla is None:
        return adapters
    rank = md.mla.q_lora_rank
    out = {}
    for module, pair in adapters.items():
        if module.endswith(".self_attention.linear_qkv"):
            base = module[: -len("linear_qkv")]
            b_q, b_kv = pair["B"][:rank], pair["B"][rank:]
            out[base + "linear_q_down_proj"] = {"A": pair["A"], "B": b_q}
            out[base + "linear_kv_down_proj"] = {"A": pair["A"], "B": b_kv}
        else:
            out[module] = pair
    return out


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A computed in fp32, rounded once to W's dtype."""
    if b.shape[0] != weight.shape[0] or a.shape[1] != weight.shape[1] or a.shape[0] != b.shape[1]:
        raise ConversionError(f"LoRA shapes A {list(a.shape)} B {list(b.shape)} do not fit the base {list(weight.shape)}")
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def module_leaf(module: str) -> str:
    """'decoder.layers.3.self_attention.linear_qkv' -> 'linear_qkv' (the --lora-target-modules name)."""
    return module.rsplit(".", 1)[-1]


def check_options(adapters: dict[str, dict[str, torch.Tensor]], options: LoraOptions, where: str) -> None:
    """--lora-r must match the shapes; --lora-target-modules must match the adapted modules."""
    for module, pair in adapters.items():
        r = pair["A"].shape[0]
        if options.rank is not None and r != options.rank:
            raise ConversionError(f"{where}: {module} has LoRA rank {r} but --lora-r is {options.rank}")
        if options.targets is not None and module_leaf(module) not in options.targets:
            raise ConversionError(f"{where}: LoRA adapter on {module_leaf(module)}, not in --lora-target-modules {options.targets}")
