"""Where every protocol tensor lives in Megatron-Core rank files: one plan for saver, loader and verify.

A pure function of the metadata, the pipeline layout and the TP/EP sizes (no I/O): for each protocol
message in protocol order, the (pipeline rank, chunk) that holds it, the megatron names with their
protocol keys and TP rules, and, for routed experts, each expert's (EP rank, local index, TP rank)
slot. The saver walks it to place what it receives, the loader to gather what it sends and to check
that every tensor of every file is planned. Names are megatron-core's local / TE spec names; the
target's naming profile (`naming_profile`) rewrites them per chunk on the way to and from the files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import ConversionError
from ..families.mcore_names import (
    EMBEDDING_PARAMS,
    FINAL_NORM_PARAMS,
    LAYER_PREFIX,
    MTP_LAYER_PREFIX,
    MTP_PARAMS,
    MTP_PREFIX,
    OUTPUT_PARAMS,
    Param,
    expert_params,
    layer_params,
)
from ..layout.pipeline import PipelineLayout, Segment
from ..transport import protocol as P
from ..transport.spec import ModelSpec

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
OUTPUT_WEIGHT = "output_layer.weight"


@dataclass(frozen=True)
class Group:
    """Parameters under one name prefix (those the metadata says the model has)."""

    prefix: str
    params: tuple[Param, ...]

    def names(self) -> list[str]:
        return [self.prefix + p.name for p in self.params]


@dataclass(frozen=True)
class Placement:
    """One protocol message's home: its segment and parameter groups; `experts` is the prefix of the
    routed experts that follow it in their own messages (MoE layers), else None."""

    message: str
    layer: int | None  # protocol layer (MTP k: num_layers + k); None: embeddings, final norm, output layer
    segment: Segment
    groups: tuple[Group, ...]
    experts: str | None = None


@dataclass(frozen=True)
class ExpertSlot:
    """Where routed expert e lives: EP rank, index among that rank's experts, and the one TP rank that
    holds it whole (--moe-tp-extend-ep), or None when it is split over every TP rank."""

    ep_rank: int
    local: int
    tp_rank: int | None


class RankFilePlan:
    """The rank-file plan of one checkpoint (see the module docstring)."""

    def __init__(self, md: ModelSpec, layout: PipelineLayout, tp: int, ep: int, impl: str, *,
                 whole_mla_down: bool = False, grouped: bool = False, tp_extend: bool = False,
                 mtp_submodule: str = "transformer_layer") -> None:
        self.md, self.layout, self.tp, self.ep, self.impl = md, layout, tp, ep, impl
        self.whole_mla_down, self.tp_extend, self.mtp_submodule = whole_mla_down, tp_extend, mtp_submodule
        self.num_experts = md.moe.num_experts if md.moe else 0
        self.mtp_layers = md.mtp_num_layers
        # Experts are dealt to EP ranks, or with --moe-tp-extend-ep to EP x TP buckets of whole experts.
        buckets = ep * tp if tp_extend else ep
        if self.num_experts % buckets:
            what = "expert-parallel ranks" if not tp_extend else "EP x TP buckets (--moe-tp-extend-ep)"
            raise ConversionError(f"{self.num_experts} experts do not split over {buckets} {what}")
        self.experts_per_rank = self.num_experts // buckets
        self.expert_params: tuple[Param, ...] = expert_params(impl, grouped) if self.num_experts else ()
        self.first, self.last = layout.first_segment(), layout.last_segment()

    def _applying(self, params: Iterable[Param]) -> tuple[Param, ...]:
        return tuple(p for p in params if p.applies(self.md))

    def _layer_group(self, prefix: str, layer: int) -> Group:
        moe = P.is_moe_layer(self.md, layer)
        return Group(prefix, self._applying(layer_params(self.impl, self.md, moe, self.whole_mla_down)))

    def placements(self, layers: Iterable[int] | None = None) -> Iterator[Placement]:
        """Every message in protocol order; `layers` (protocol numbering, MTP after the decoder's)
        restricts the layer messages to those a worker handles."""
        md, wanted = self.md, None if layers is None else set(layers)
        yield Placement(P.EMBEDDINGS, None, self.first, (Group("", self._applying(EMBEDDING_PARAMS)),))
        for layer in range(md.num_layers):
            if wanted is None or layer in wanted:
                seg, local = self.layout.locate_real(layer)
                yield self._layer(P.layer_message(layer), layer, seg, LAYER_PREFIX.format(layer=local))
        yield Placement(P.FINAL_NORM, None, self.last, (Group("", self._applying(FINAL_NORM_PARAMS)),))
        if md.output_layer:
            yield Placement(P.OUTPUT_LAYER, None, self.last, (Group("", self._applying(OUTPUT_PARAMS)),))
        for k in range(self.mtp_layers):
            if wanted is None or md.num_layers + k in wanted:
                yield self._layer(P.mtp_message(k), md.num_layers + k, self.last,
                                  MTP_LAYER_PREFIX.format(index=k, submodule=self.mtp_submodule),
                                  Group(MTP_PREFIX.format(index=k), MTP_PARAMS))

    def _layer(self, message: str, layer: int, seg: Segment, prefix: str, extra: Group | None = None) -> Placement:
        groups = ((extra,) if extra else ()) + (self._layer_group(prefix, layer),)
        return Placement(message, layer, seg, groups, prefix if P.is_moe_layer(self.md, layer) else None)

    def expert_slot(self, expert: int) -> ExpertSlot:
        bucket, local = divmod(expert, self.experts_per_rank)
        if self.tp_extend:  # bucket b = ep_rank * TP + tp_rank holds whole experts
            ep_rank, tp_rank = divmod(bucket, self.tp)
            return ExpertSlot(ep_rank, local, tp_rank)
        return ExpertSlot(bucket, local, None)

    def expert_names(self, prefix: str) -> list[str]:
        """The routed-expert names of one MoE layer on any one EP rank."""
        return [prefix + p.name.format(expert=e) for e in range(self.experts_per_rank) for p in self.expert_params]

    def tied_copies(self) -> list[str]:
        """Names the last stage holds as copies of the word embeddings, as megatron-core builds it: a
        tied output layer, and MTP's own embedding, when the first and last stages are different chunks."""
        if not self.layout.split_ends():
            return []
        return [name for name, needed in ((OUTPUT_WEIGHT, not self.md.output_layer), (WORD_EMBEDDINGS, self.mtp_layers > 0))
                if needed]

    def names(self, pp_rank: int, chunk: int) -> set[str]:
        """Every tensor one chunk of one rank file holds (the same on every TP and EP rank)."""
        names: set[str] = set()
        for placement in self.placements():
            if (placement.segment.pp_rank, placement.segment.chunk) == (pp_rank, chunk):
                for group in placement.groups:
                    names.update(group.names())
                if placement.experts is not None:
                    names.update(self.expert_names(placement.experts))
        if (pp_rank, chunk) == (self.last.pp_rank, self.last.chunk):
            names.update(self.tied_copies())
        return names


def check_divisible(md: ModelSpec, tp: int, pp: int, ep: int) -> None:
    """The target sizes split every dimension they split (`pp` is checked by the pipeline layout)."""
    experts = md.moe.num_experts if md.moe else 0
    sizes = [("num_attention_heads", md.num_attention_heads), ("ffn_hidden_size", md.ffn_hidden_size)]
    if md.mla is None:
        sizes.append(("num_query_groups", md.num_query_groups))
    if md.moe:
        sizes += [("moe_ffn_hidden_size", md.moe.ffn_hidden_size),
                  ("moe_shared_expert_intermediate_size", md.moe.shared_expert_intermediate_size)]
    for what, size in sizes:
        if size is not None and size % tp:  # None: no shared expert
            raise ConversionError(f"--target-tensor-parallel-size {tp} does not divide {what} {size}")
    if ep > 1 and not experts:
        raise ConversionError("--target-expert-parallel-size > 1 needs a model with experts")
    if experts % ep:
        raise ConversionError(f"--target-expert-parallel-size {ep} does not divide the {experts} experts")
