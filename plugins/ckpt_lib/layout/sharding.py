"""Tensor-parallel sharding rules and their inverses (gather). Pure tensor functions, no I/O.

Rules (Megatron-Core naming):
- `replicated`: every rank holds the whole tensor (norms, biases of row-parallel linears).
- `column`: split on dim 0 (linear_qkv, q/k/v already interleaved per query group; vocab tables).
- `row`: split on dim 1 (linear_proj, linear_fc2).
- `gated`: SwiGLU linear_fc1 built from two halves (gate W, up V); each is split on dim 0 and
  rank i holds `[W_i; V_i]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConversionError

REPLICATED, COLUMN, ROW, GATED = "replicated", "column", "row", "gated"


class Joined:
    """Tensors concatenated along `dim` as one tensor of the output, never built in memory
    (SwiGLU's fc1 shard [gate_i; up_i]). Indexing a joined stack gives one joined matrix."""

    def __init__(self, parts: list[torch.Tensor], dim: int = 0) -> None:
        first = parts[0]
        shape = list(first.shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.parts, self.dim, self.shape, self.dtype = parts, dim, torch.Size(shape), first.dtype
        self.nbytes = sum(p.nbytes for p in parts)

    def __getitem__(self, index: int) -> Joined:
        if self.dim == 0:
            raise TypeError("Joined: only a joined stack (dim > 0) can be indexed")
        return Joined([p[index] for p in self.parts], self.dim - 1)

    def materialize(self) -> torch.Tensor:
        return torch.cat([materialize(p) for p in self.parts], self.dim)

    def numel(self) -> int:
        return self.shape.numel()

    def detach(self) -> Joined:
        """Written as it is (the writers' tensor interface)."""
        return self


class Cast:
    """A tensor written in another dtype (`--params-dtype`), converted in the one copy into the output file's
    buffer: no converted full-size copy in memory."""

    def __init__(self, source: torch.Tensor, dtype: torch.dtype) -> None:
        self.source, self.dtype, self.shape = source, dtype, source.shape
        self.nbytes = source.numel() * dtype.itemsize

    def materialize(self) -> torch.Tensor:
        return self.source.to(self.dtype)


def cast(value: torch.Tensor | Joined, dtype: torch.dtype) -> torch.Tensor | Joined | Cast:
    """`value` as `dtype`, converted only when written (or materialized)."""
    if value.dtype == dtype:
        return value
    if isinstance(value, Joined):
        return Joined([cast(p, dtype) for p in value.parts], value.dim)
    return Cast(value, dtype)


def materialize(value: Any) -> Any:
    """A real tensor for code that computes with it (renames that regroup, quantisation)."""
    return value.materialize() if isinstance(value, Joined | Cast) else value


def _check_divisible(size: int, tp: int, what: str) -> None:
    if size % tp:
        raise ConversionError(f"{what}: size {size} is not divisible by tensor parallel size {tp}")


def split(t: torch.Tensor | tuple[torch.Tensor, torch.Tensor], rule: str, tp: int, what: str = "tensor",
          joined: bool = False) -> list[torch.Tensor]:
    """Split a full tensor into `tp` shards (views where the rule allows; with `joined`, gated shards
    are `Joined` pairs, written without a concatenated copy)."""
    if rule == REPLICATED:
        return [t] * tp
    if rule == GATED:
        gate, up = t
        pairs = zip(split(gate, COLUMN, tp, what), split(up, COLUMN, tp, what))
        return [Joined(list(pair)) if joined else torch.cat(pair, dim=0) for pair in pairs]
    if rule == ROW and t.dim() == 1:
        return [t] * tp
    dim = 0 if rule == COLUMN else 1
    if rule not in (COLUMN, ROW):
        raise ValueError(f"unknown sharding rule {rule}")
    _check_divisible(t.shape[dim], tp, what)
    return list(torch.chunk(t, tp, dim=dim))


def split_stacked(t: torch.Tensor | tuple[torch.Tensor, torch.Tensor], rule: str, tp: int, what: str = "tensor",
                  joined: bool = False) -> list[torch.Tensor | Joined]:
    """`split` applied to every matrix of a stack [k, ...] at once (experts of one message), as views;
    with `joined`, gated stacks are `Joined` along dim 1: indexing one expert gives its joined shard."""
    if rule == GATED:
        gate, up = t
        gates, ups = split_stacked(gate, COLUMN, tp, what), split_stacked(up, COLUMN, tp, what)
        return [Joined([g, u], dim=1) if joined else torch.cat((g, u), dim=1) for g, u in zip(gates, ups)]
    if rule not in (COLUMN, ROW) or t.dim() != 3:
        raise ValueError(f"split_stacked: {what} needs a stack of matrices with a column/row/gated rule")
    dim = 1 if rule == COLUMN else 2
    _check_divisible(t.shape[dim], tp, what)
    return list(torch.chunk(t, tp, dim=dim))


def gather(shards: list[torch.Tensor], rule: str, what: str = "tensor",
           empty: Callable[[list[int], torch.dtype], torch.Tensor] | None = None,
           copy: Callable[[torch.Tensor, torch.Tensor], None] = torch.Tensor.copy_) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `split`: rebuild the full tensor (a (gate, up) pair for `gated`). With `empty`, the result is
    copied once into `empty(shape, dtype)` (a loader's shared memory, queued without another copy), never a
    view of a shard (whose storage the queue would otherwise move into shared memory, under the shard's owner);
    each shard goes into its slab with `copy(slab, shard)` (a loader reads it from its file straight into place)."""

    def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        if empty is None:
            return torch.cat(parts, dim=dim)
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        out, start = empty(shape, parts[0].dtype), 0
        for i, part in enumerate(parts):
            if part.dim() != len(shape) or any(a != b for d, (a, b) in enumerate(zip(part.shape, shape)) if d != dim):
                raise ConversionError(f"{what}: shard {i} has shape {tuple(part.shape)}, the others {tuple(parts[0].shape)}")
            copy(out.narrow(dim, start, part.shape[dim]), part)
            start += part.shape[dim]
        return out

    if rule == REPLICATED or (rule == ROW and shards[0].dim() == 1):
        first = shards[0]
        for i, other in enumerate(shards[1:], start=1):
            if other.shape != first.shape:
                raise ConversionError(f"{what}: replicated shards differ in shape ({tuple(first.shape)} vs {tuple(other.shape)} on rank {i})")
        return first if empty is None else cat([first], 0)
    if rule == GATED:
        halves = []
        for i, s in enumerate(shards):
            if s.shape[0] % 2:
                raise ConversionError(f"{what}: gated shard on rank {i} has an odd number of rows {s.shape[0]}")
            halves.append(torch.chunk(s, 2, dim=0))
        return cat([h[0] for h in halves], 0), cat([h[1] for h in halves], 0)
    dim = 0 if rule == COLUMN else 1
    if len(shards) == 1 and empty is None:
        return shards[0]
    return cat(shards, dim)


def pad_vocab(table: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Trim or pad a vocabulary table to `padded_size` rows; new rows repeat the last row (upstream rule)."""
    rows = table.shape[0]
    if rows == padded_size:
        return table
    if rows > padded_size:
        return table[:padded_size]
    return torch.cat([table, table[-1:].expand(padded_size - rows, *table.shape[1:])], dim=0)


def padded_vocab_size(true_vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: round up to a multiple of `make_vocab_size_divisible_by * TP`."""
    multiple = divisible_by * tp
    return -(-true_vocab_size // multiple) * multiple
