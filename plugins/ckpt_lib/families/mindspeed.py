"""MindSpeed-LLM naming profile: reversible rewrites of one rank file's state dict.

The saver places tensors under megatron-core local-spec names (with the MLA down projections
kept whole, as MindSpeed-LLM does) and rewrites each chunk just before writing; the loader applies
the inverse right after reading. Every rewrite is a pure function of one chunk:

- MLA down projections fused: `linear_qkv.weight` = cat[linear_q_down_proj; linear_kv_down_proj];
- `--mla-mm-split`: the two up projections become `linear_qk_nope`, `linear_qk_rope`,
  `linear_kv_nope`, `linear_v`, carved per head (each TP rank holds whole heads, so carving the
  rank's shard equals sharding the carved matrix);
- `--moe-grouped-gemm`: experts as `mlp.experts.weight1` [H, E_loc*2F'] (a raw reshape of
  [E_loc, H, 2F'], expert e's slice is `[gate; up]^T`, not a horizontal stack) and `weight2`
  [E_loc*F', H] (megatron-core's legacy GroupedMLP layout, also used with the local spec);
- with MTP, `decoder.final_layernorm` is `final_layernorm` and the MTP norm is `mtp.final_layernorms.<i>`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ConversionError
from ..transport.spec import MLASpec, ModelSpec

EXPERT_FC = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.linear_fc([12])\.weight$")
GROUPED = re.compile(r"^(.*\.mlp\.experts\.)weight([12])$")
MTP_NORM = re.compile(r"^mtp\.layers\.(\d+)\.final_layernorm\.weight$")
MTP_NORM_MS = re.compile(r"^mtp\.final_layernorms\.(\d+)\.weight$")
SA = ".self_attention."


def group_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SequentialMLP names -> GroupedMLP `weight1` / `weight2` (megatron-core legacy layout)."""
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = EXPERT_FC.match(name)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
        else:
            out[name] = t
    for (prefix, fc), by_index in experts.items():
        ordered = [by_index[i] for i in range(len(by_index))]
        hidden = ordered[0].shape[1] if fc == "1" else ordered[0].shape[0]
        if fc == "1":  # [2F', H] each -> [E, H, 2F'] -> raw reshape [H, E*2F']
            out[prefix + "weight1"] = torch.stack([t.t() for t in ordered]).reshape(hidden, -1)
        else:  # [H, F'] each -> [E, F', H] -> [E*F', H]
            out[prefix + "weight2"] = torch.stack([t.t() for t in ordered]).reshape(-1, hidden)
    return out


def ungroup_experts(state: dict[str, Any], num_local_experts: int, hidden: int) -> dict[str, Any]:
    """Inverse of `group_experts`."""
    out: dict[str, Any] = {}
    for name, t in state.items():
        m = GROUPED.match(name)
        if not m:
            out[name] = t
            continue
        if m[2] == "1":
            if t.shape[0] != hidden or t.shape[1] % num_local_experts:
                raise ConversionError(f"{name}: shape {list(t.shape)} is not [H={hidden}, E_local={num_local_experts} x 2F]")
            for i, w in enumerate(t.reshape(num_local_experts, hidden, -1)):
                out[f"{m[1]}local_experts.{i}.linear_fc1.weight"] = w.t()
        else:
            if t.shape[1] != hidden or t.shape[0] % num_local_experts:
                raise ConversionError(f"{name}: shape {list(t.shape)} is not [E_local={num_local_experts} x F, H={hidden}]")
            for i, w in enumerate(t.reshape(num_local_experts, -1, hidden)):
                out[f"{m[1]}local_experts.{i}.linear_fc2.weight"] = w.t()
    return out


def fuse_mla_down(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for name in [n for n in state if n.endswith(SA + "linear_q_down_proj.weight")]:
        base = name[: -len("linear_q_down_proj.weight")]
        out[base + "linear_qkv.weight"] = torch.cat([out.pop(name), out.pop(base + "linear_kv_down_proj.weight")])
    return out


def split_mla_down(state: dict[str, Any], q_lora_rank: int) -> dict[str, Any]:
    out = dict(state)
    for name in [n for n in state if n.endswith(SA + "linear_qkv.weight")]:
        base = name[: -len("linear_qkv.weight")]
        fused = out.pop(name)
        out[base + "linear_q_down_proj.weight"], out[base + "linear_kv_down_proj.weight"] = fused[:q_lora_rank], fused[q_lora_rank:]
    return out


def _carve(t: torch.Tensor, parts: list[int]) -> list[torch.Tensor]:
    """Rows grouped per head [head][part rows] -> one matrix per part, head-major."""
    per_head = t.reshape(-1, sum(parts), t.shape[-1])
    return [p.reshape(-1, t.shape[-1]) for p in torch.split(per_head, parts, dim=1)]


def _uncarve(pieces: list[torch.Tensor], parts: list[int]) -> torch.Tensor:
    heads = pieces[0].shape[0] // parts[0]
    return torch.cat([p.reshape(heads, n, -1) for p, n in zip(pieces, parts)], dim=1).reshape(heads * sum(parts), -1)


MM_SPLIT = (("linear_q_up_proj.weight", ("linear_qk_nope.weight", "linear_qk_rope.weight"), ("qk_head_dim", "qk_pos_emb_head_dim")),
            ("linear_kv_up_proj.weight", ("linear_kv_nope.weight", "linear_v.weight"), ("qk_head_dim", "v_head_dim")))


def mm_split(state: dict[str, torch.Tensor], mla: MLASpec) -> dict[str, torch.Tensor]:
    out = dict(state)
    for fused, names, dims in MM_SPLIT:
        for name in [n for n in state if n.endswith(SA + fused)]:
            base = name[: -len(fused)]
            for piece_name, piece in zip(names, _carve(out.pop(name), [getattr(mla, d) for d in dims])):
                out[base + piece_name] = piece
    return out


def mm_unsplit(state: dict[str, Any], mla: MLASpec) -> dict[str, Any]:
    out = dict(state)
    for fused, names, dims in MM_SPLIT:
        for name in [n for n in state if n.endswith(SA + names[0])]:
            base = name[: -len(names[0])]
            out[base + fused] = _uncarve([out.pop(base + n) for n in names], [getattr(mla, d) for d in dims])
    return out


def rename_norms(state: dict[str, torch.Tensor], mtp: bool) -> dict[str, torch.Tensor]:
    if not mtp:
        return state
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = MTP_NORM.match(name)
        name = f"mtp.final_layernorms.{m[1]}.weight" if m else name
        out["final_layernorm.weight" if name == "decoder.final_layernorm.weight" else name] = t
    return out


def unrename_norms(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, t in state.items():
        m = MTP_NORM_MS.match(name)
        name = f"mtp.layers.{m[1]}.final_layernorm.weight" if m else name
        out["decoder.final_layernorm.weight" if name == "final_layernorm.weight" else name] = t
    return out


def to_mindspeed(state: dict[str, torch.Tensor], md: ModelSpec, grouped_gemm: bool, mla_mm_split: bool) -> dict[str, torch.Tensor]:
    """Rewrite one chunk from megatron-core local names to MindSpeed-LLM names."""
    if md.mla:
        state = fuse_mla_down(state)
        if mla_mm_split:
            state = mm_split(state, md.mla)
    if grouped_gemm:
        state = group_experts(state)
    return rename_norms(state, bool(md.mtp_num_layers))


def from_mindspeed(state: dict[str, Any], md: ModelSpec, num_local_experts: int) -> dict[str, Any]:
    """Inverse of `to_mindspeed`, detecting which rewrites the chunk carries."""
    state = unrename_norms(state)
    if any(GROUPED.match(n) for n in state):
        state = ungroup_experts(state, num_local_experts, md.hidden_size)
    if md.mla:
        state = mm_unsplit(state, md.mla)
        state = split_mla_down(state, md.mla.q_lora_rank)
    return state


def is_mindspeed(names: list[str]) -> bool:
    """MindSpeed-LLM files: fused MLA down projection, mm-split, grouped experts or renamed norms."""
    return any(n.endswith((SA + "linear_qk_nope.weight",)) or GROUPED.match(n) or MTP_NORM_MS.match(n)
               or n == "final_layernorm.weight" for n in names) or (
        any(n.endswith(SA + "linear_qkv.weight") for n in names) and any("linear_q_up_proj" in n or "linear_qk_nope" in n for n in names))
