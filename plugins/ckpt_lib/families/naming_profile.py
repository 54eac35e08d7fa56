"""The target's names and packing beyond megatron-core's spec names, as one reversible stage per chunk.

The rank-file plan (`mcore_plan`) speaks megatron-core local / TE names. A profile rewrites one
chunk's state dict just before it is written, and the loader undoes it right after reading:
MindSpeed-LLM's names (`mindspeed`: fused MLA down projection, mm-split, renamed norms, grouped
experts), megatron-core's legacy GroupedMLP `weight1`/`weight2` for the local spec, and QLoRA's NF4
packing (`qlora`). Reading detects what a chunk carries, so files from Megatron-LM, MindSpeed-LLM
or this saver all read without being told. megatron-core release names (MTP's submodule) are chosen
in the plan's prefixes, as they differ in the prefix only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConversionError
from ..io.qlora import dequantize_nf4, quantize_nf4
from ..layout.sharding import materialize
from ..transport.spec import ModelSpec
from .mindspeed import from_mindspeed, group_experts, to_mindspeed

MEGATRON_CORE, MINDSPEED = "megatron-core", "mindspeed"


@dataclass(frozen=True)
class NamingProfile:
    naming: str = MEGATRON_CORE
    impl: str = "transformer_engine"
    grouped: bool = False  # --moe-grouped-gemm
    mm_split: bool = False  # --mla-mm-split (MindSpeed-LLM)
    nf4: bool = False  # --qlora-nf4
    tp_extend: bool = False  # --moe-tp-extend-ep (MindSpeed-LLM): whole experts per TP rank

    @property
    def identity(self) -> bool:
        """Whether writing keeps megatron-core's names and values (what the optimizer-state layout assumes)."""
        return self.naming == MEGATRON_CORE and not self.grouped and not self.nf4

    def check(self, md: ModelSpec, tp: int, ep: int, dualpipev: bool) -> None:
        """The seeds' exclusions between MindSpeed-LLM options, for a model and target sizes."""
        mindspeed, experts = self.naming == MINDSPEED, md.moe.num_experts if md.moe else 0
        if (self.mm_split or self.tp_extend) and not mindspeed:
            raise ConversionError("--mla-mm-split and --moe-tp-extend-ep are MindSpeed-LLM layouts: add --naming mindspeed")
        if self.mm_split and md.mla is None:
            raise ConversionError("--mla-mm-split needs an MLA model")
        if mindspeed and md.mla and not md.mla.q_lora_rank:
            raise ConversionError("--naming mindspeed: MindSpeed-LLM's layout of MLA without q_lora_rank (a plain query "
                                  "projection) is not known here; write megatron-core names")
        if self.tp_extend and not self.grouped:
            raise ConversionError("--moe-tp-extend-ep needs --moe-grouped-gemm")
        if (self.grouped or self.tp_extend) and not experts:
            raise ConversionError("--moe-grouped-gemm / --moe-tp-extend-ep need a model with experts")
        if self.tp_extend and experts % (ep * tp):
            raise ConversionError(f"--moe-tp-extend-ep: EP x TP = {ep * tp} does not divide the {experts} experts")
        if mindspeed and dualpipev and tp > 1 and not self.tp_extend:
            raise ConversionError("--schedules-method dualpipev with TP > 1 needs --moe-tp-extend-ep (MindSpeed-LLM)")

    def write(self, chunk: dict[str, Any], md: ModelSpec) -> dict[str, Any]:
        """Spec names -> the files' names and packing. Shards stay views and `Joined` pairs (copied
        once, into the rank file's buffer) unless a rewrite computes with them."""
        if self.naming == MINDSPEED or self.grouped or self.nf4:
            chunk = {name: materialize(value) for name, value in chunk.items()}
        if self.naming == MINDSPEED:
            chunk = to_mindspeed(chunk, md, self.grouped, self.mm_split)
        elif self.grouped and self.impl == "local":
            chunk = group_experts(chunk)
        if self.nf4:
            chunk = quantize_nf4(chunk)
        return chunk

    @staticmethod
    def read(chunk: dict[str, Any], md: ModelSpec, experts_per_rank: int) -> dict[str, Any]:
        """The inverse of `write`, for whichever profile the chunk was written with."""
        return dequantize_nf4(from_mindspeed(chunk, md, experts_per_rank))
