"""Family tables: declarative, reversible relations between a source format's tensor names and
protocol keys. A new model family is a new table; loaders run a table forwards, `saver_hf` runs
the same table backwards, so a round trip is correct by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConversionError
from ..io.safetensors_io import Pending, empty_shared
from ..layout.sharding import Joined
from ..transport.spec import ModelSpec, flag_holds

Tensors = tuple[torch.Tensor, ...]


def concat(tensors: list[Any] | Tensors, dim: int = 0) -> torch.Tensor:
    """torch.cat into shared memory (passed to the saver without a copy); parts not read yet
    (`Pending`) are read straight into place. On meta tensors (the validation run) only the shape is
    worked out: torch's meta cat imports torch._dynamo (~1 s)."""
    first = tensors[0]
    dim %= first.dim()
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    if first.is_meta:
        others = [[s for i, s in enumerate(t.shape) if i != dim] for t in tensors]
        if any(t.dim() != first.dim() or o != others[0] for t, o in zip(tensors, others)):
            raise ConversionError(f"cannot join tensors of shapes {[list(t.shape) for t in tensors]} along dimension {dim}")
        return torch.empty(shape, dtype=first.dtype, device="meta")
    if any(t.dtype != first.dtype for t in tensors):
        return torch.cat(tuple(loaded(t) for t in tensors), dim)
    out, offset = empty_shared(shape, first.dtype), 0
    for t in tensors:
        part = out.narrow(dim, offset, t.shape[dim])
        if isinstance(t, Pending):
            t.read_into(part)
        else:
            part.copy_(t)
        offset += t.shape[dim]
    return out


def loaded(t: Any) -> Any:
    """A tensor, read now if it was `Pending`."""
    return t.load() if isinstance(t, Pending) else t


def stack(tensors: list[torch.Tensor] | Tensors, dim: int = 0) -> torch.Tensor:
    """torch.stack, as `concat`."""
    return concat([t.unsqueeze(dim) for t in tensors], dim)


@dataclass(frozen=True)
class Op:
    """A reversible tensor operation between source tensors and protocol tensors."""

    name: str
    forward: Callable[[Tensors, Any], Tensors]
    backward: Callable[[Tensors, Any], Tensors]
    joins: bool = False  # forward only joins its inputs (shape, reshape, concat): it takes them `Pending`


def _identity(tensors: Tensors, md: Any) -> Tensors:
    return tensors


def _interleave_qkv(tensors: Tensors, md: Any) -> Tensors:
    """HF q, k, v -> Megatron's per-query-group interleaved [q heads of g; k_g; v_g] rows."""
    q, k, v = tensors
    groups, dim = md.num_query_groups, md.kv_channels
    heads_per_group = md.num_attention_heads // groups
    expect = (md.num_attention_heads * dim, groups * dim, groups * dim)
    if (q.shape[0], k.shape[0], v.shape[0]) != expect:
        raise ConversionError(
            f"q/k/v have {q.shape[0]}/{k.shape[0]}/{v.shape[0]} rows, expected {expect[0]}/{expect[1]}/{expect[2]} "
            f"for {md.num_attention_heads} heads, {groups} query groups, head dim {dim}"
        )
    rest = q.shape[1:]
    fused = concat(
        [q.reshape(groups, heads_per_group * dim, *rest), k.reshape(groups, dim, *rest), v.reshape(groups, dim, *rest)],
        dim=1,
    )
    return (fused.reshape(-1, *rest),)


def _deinterleave_qkv(tensors: Tensors, md: Any) -> Tensors:
    """Inverse of `_interleave_qkv`."""
    (fused,) = tensors
    groups, dim = md.num_query_groups, md.kv_channels
    heads_per_group = md.num_attention_heads // groups
    rows = (heads_per_group + 2) * dim * groups
    if fused.shape[0] != rows:
        raise ConversionError(f"linear_qkv has {fused.shape[0]} rows, expected {rows}")
    rest = fused.shape[1:]
    q, k, v = torch.split(fused.reshape(groups, (heads_per_group + 2) * dim, *rest), [heads_per_group * dim, dim, dim], dim=1)
    # Each group's rows as they lie in the fused tensor, written one after another: no gathered copy (`Joined`).
    return tuple(Joined(list(part.unbind(0))) if groups > 1 else part[0] for part in (q, k, v))


RENAME = Op("rename", _identity, _identity)
QKV = Op("qkv-interleave", _interleave_qkv, _deinterleave_qkv, joins=True)


@dataclass(frozen=True)
class Relation:
    """Source names (relative to a prefix) <-> protocol keys through `op`, when the spec flag `when` holds
    (`spec.flag_holds`: a field path such as `mla.q_lora_rank`, `!` negating it)."""

    source: tuple[str, ...]
    keys: tuple[str, ...]
    op: Op = RENAME
    when: str | None = None

    def applies(self, md: ModelSpec) -> bool:
        return self.when is None or flag_holds(md, self.when)


@dataclass(frozen=True)
class Section:
    """One protocol message (`message`, or a layer when `message` is None) and its relations."""

    message: str | None
    prefix: str
    relations: tuple[Relation, ...]
    when: str | None = None

    def applies(self, md: ModelSpec) -> bool:
        return self.when is None or flag_holds(md, self.when)

    def active(self, md: ModelSpec) -> list[Relation]:
        return [r for r in self.relations if r.applies(md)]


def to_protocol(section: Section, read: Callable[[str], Any], md: ModelSpec, layer: int | None = None) -> dict[str, torch.Tensor]:
    """Run a section forwards: read source tensors, return protocol key -> tensor."""
    prefix = section.prefix.format(layer=layer)
    out: dict[str, torch.Tensor] = {}
    for rel in section.active(md):
        inputs = tuple(read(prefix + s) for s in rel.source)
        produced = rel.op.forward(inputs if rel.op.joins else tuple(loaded(t) for t in inputs), md)
        out.update(zip(rel.keys, (loaded(t) for t in produced)))
    return out


def from_protocol(section: Section, msg: dict[str, Any], md: ModelSpec, layer: int | None = None) -> dict[str, torch.Tensor]:
    """Run a section backwards: pop protocol keys from `msg`, return source name -> tensor."""
    from ..transport.protocol import take

    prefix = section.prefix.format(layer=layer)
    out: dict[str, torch.Tensor] = {}
    for rel in section.active(md):
        produced = rel.op.backward(tuple(take(msg, k) for k in rel.keys), md)
        out.update((prefix + s, t) for s, t in zip(rel.source, produced))
    return out


def experts_to_protocol(section: Section, read: Callable[[str], Any], md: ModelSpec, layer: int | None,
                        first: int, count: int) -> dict[str, torch.Tensor]:
    """Stack experts [first, first+count) of one layer into protocol keys ([count, out, in]). A relation
    whose source has no `{expert}` names one tensor holding all experts ([E, ...]): its rows
    [first, first+count) are read and go through the relation's op."""
    prefix = section.prefix.format(layer=layer)
    out: dict[str, torch.Tensor] = {}
    for rel in section.active(md):
        if "{expert}" in rel.source[0]:
            out[rel.keys[0]] = stack([read(prefix + rel.source[0].format(expert=e)) for e in range(first, first + count)])
            continue
        whole = read(prefix + rel.source[0])
        experts = md.moe.num_experts if md.moe else 0
        if whole.shape[0] != experts:
            raise ConversionError(f"{prefix + rel.source[0]}: {whole.shape[0]} experts in dimension 0, expected {experts}")
        rows = whole.rows(first, count) if isinstance(whole, Pending) else whole.narrow(0, first, count)
        out.update(zip(rel.keys, rel.op.forward((loaded(rows),), md)))
    return out


def experts_from_protocol(section: Section, msg: dict[str, Any], md: ModelSpec, layer: int | None,
                          first: int) -> dict[str, torch.Tensor]:
    """Inverse of `experts_to_protocol`: source name -> one expert's tensor (views of the stack)."""
    from ..transport.protocol import take

    prefix = section.prefix.format(layer=layer)
    out: dict[str, torch.Tensor] = {}
    for rel in section.active(md):
        for offset, tensor in enumerate(take(msg, rel.keys[0])):
            out[prefix + rel.source[0].format(expert=first + offset)] = tensor
    return out


@dataclass(frozen=True)
class MoeTables:
    """An HF MoE family's tables for one checkpoint: its MoE and dense decoder layers and its routed experts
    (the on-disk expert layout a loader found, or the one a saver writes)."""

    moe_layer: Section
    dense_layer: Section
    experts: Section

    def layer_section(self, md: ModelSpec, layer: int) -> Section:
        from ..transport.protocol import is_moe_layer

        return self.moe_layer if is_moe_layer(md, layer) else self.dense_layer
