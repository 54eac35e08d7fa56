"""The protocol messages a saver is about to receive, as meta tensors: what it plans its output from.

`saver_hf` runs its writing code on these first (the same family tables, so the plan cannot drift from what
is written) to learn every output tensor's name, dtype and shape before the first message arrives: a
safetensors shard's header can then be written before its tensors. The metadata gives every shape; the dtypes
are predicted (the params dtype, Megatron's router expert bias in fp32) and so is the experts' chunking (the
loaders' --experts-per-message). `Observed` records what really arrives, so that a plan made again after a
wrong prediction is exact for every message received and predicts the others from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

from ..io.safetensors_io import Spec, spec
from . import protocol as P
from .spec import ModelSpec

LAYER = re.compile(r"^(transformer|mtp) layer \d+")


def kind(message: str) -> str:
    """Messages whose keys share their dtypes: every decoder and MTP layer alike, and their experts."""
    return LAYER.sub("layer", message)


class Observed:
    """What the messages received so far held: each message's tensor specs, the latest of each kind, and how
    many experts a message carries (the first experts message of a layer tells)."""

    def __init__(self, experts_per_message: int) -> None:
        self.messages: dict[str, list[dict[str, Spec]]] = {}
        self.kinds: dict[str, dict[str, Spec]] = {}
        self.experts_per_message = experts_per_message

    def record(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        specs = {k: spec(v) for k, v in msg.items() if isinstance(v, torch.Tensor)}
        self.messages.setdefault(msg.get("name"), []).append(specs)
        self.kinds.setdefault(kind(str(msg.get("name"))), {}).update(specs)
        if msg.get(P.FIRST_EXPERT) == 0 and P.FC2_W in specs:
            self.experts_per_message = specs[P.FC2_W].shape[0]


class ObservingReader(P.MessageReader):
    """A MessageReader that records every message it hands out."""

    def __init__(self, queue: Any, checking: bool, observed: Observed) -> None:
        super().__init__(queue, checking)
        self.observed = observed

    def get_raw(self) -> Any:
        msg = super().get_raw()
        self.observed.record(msg)
        return msg


def planned_reader(md: ModelSpec, vocab: int, observed: Observed, checking: bool) -> P.MessageReader:
    """A MessageReader over the messages still to come after the metadata, on meta tensors."""
    return P.MessageReader(SimpleNamespace(get=planned_messages(md, vocab, observed).__next__), checking)


def planned_messages(md: ModelSpec, vocab: int, observed: Observed) -> Iterator[Any]:
    """Every message after the metadata, in protocol order, as received where it was, else as predicted."""

    def meta(name: str, shapes: dict[str, tuple[int, ...]], nth: int = 0) -> dict[str, Any]:
        received = observed.messages.get(name, [])
        if nth < len(received):
            specs = received[nth]
        else:
            alike = observed.kinds.get(kind(name), {})
            specs = {k: Spec(alike[k].dtype if k in alike else predicted(k), shape) for k, shape in shapes.items()}
        return {"name": name, **{k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in specs.items()}}

    def predicted(key: str) -> torch.dtype:
        if key == P.ROUTER_BIAS or not isinstance(md.params_dtype, torch.dtype):  # learnt from the messages if wrong
            return torch.float32
        return md.params_dtype

    def layer(name: str, index: int, shapes: dict[str, tuple[int, ...]]) -> Iterator[dict[str, Any]]:
        yield meta(name, shapes)
        if not P.is_moe_layer(md, index):
            return
        first, nth = 0, 0
        experts = md.moe.num_experts if md.moe else 0
        while first < experts:
            count = min(observed.experts_per_message, experts - first)
            msg = meta(P.experts_message(name), P.expert_shapes(md, count), nth)
            count = msg[P.FC2_W].shape[0]  # as received, where it was
            yield {**msg, P.FIRST_EXPERT: first}
            first, nth = first + count, nth + 1

    shapes = P.global_shapes(md, vocab)
    yield meta(P.EMBEDDINGS, shapes[P.EMBEDDINGS])
    for index in range(md.num_layers):
        yield from layer(P.layer_message(index), index, P.layer_shapes(md, index))
    yield meta(P.FINAL_NORM, shapes[P.FINAL_NORM])
    if md.output_layer:
        yield meta(P.OUTPUT_LAYER, shapes[P.OUTPUT_LAYER])
    for k in range(md.mtp_num_layers):
        yield from layer(P.mtp_message(k), md.num_layers + k, P.mtp_shapes(md))
    yield P.DONE
