"""Receive protocol messages and write a Megatron-Core checkpoint at a target layout.

The rank-file plan (`mcore_plan`) says where each message goes; tensors are split as they arrive
and handed to the writer (`mcore_writers`: legacy rank files through the naming profile, or
torch_dist) after each message, so memory holds about one layer whatever the size of a pipeline
stage; a stage's files are closed when its last layer has arrived.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..families import mcore_version, rope_scaling
from ..families.mcore_names import VOCAB, Param
from ..families.megatron import megatron_args
from ..families.naming_profile import MEGATRON_CORE, MINDSPEED, NamingProfile
from ..io.manifest import Manifest, add_checksum_arguments, chosen_checksum, default_rank_file_checksum
from ..io.megatron_io import iteration_dir_name, write_tracker
from ..io.staging import StagedDir, check_target
from ..layout.pipeline import PipelineLayout, Segment, parse_layer_list
from ..layout.sharding import COLUMN, cast, pad_vocab, padded_vocab_size, split, split_stacked
from ..transport import protocol as P
from ..transport.runtime import Summary, progress
from ..transport.shares import Share, layers_to_send, target_layout, target_sizes
from ..transport.spec import ModelSpec
from . import optimizer_state
from .mcore_plan import WORD_EMBEDDINGS, Group, Placement, RankFilePlan, check_divisible
from .mcore_writers import FORMATS


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None,
                       help="A Megatron-LM checkout: not needed, but its megatron/core version sets --target-mcore-version's default")
    group.add_argument("--target-mcore-version", type=str, default=None,
                       help="megatron-core release (X.Y) that will load the checkpoint; names differ from 0.17 on "
                            "(MTP). Default: the Megatron-LM checkout's, else the installed megatron-core's, "
                            f"else {mcore_version.NEWEST[0]}.{mcore_version.NEWEST[1]}")
    group.add_argument("--target-tensor-parallel-size", type=int, default=None,
                       help="Target TP size (default: the source's, else 1)")
    group.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                       help="Target PP size (default: the source's, else 1)")
    group.add_argument("--target-expert-parallel-size", type=int, default=1, help="Target EP size (MoE models)")
    group.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                       help="Legacy per-rank files (torch) or megatron-core dist_checkpointing (torch_dist, Megatron-LM's "
                            "default, layout free: the target sizes are recorded in args, megatron-core reshards on load)")
    group.add_argument("--num-layer-list", type=str, default=None,
                       help="Layers per pipeline stage, e.g. 4,3,3 (uneven PP; exclusive with VPP and noop layers)")
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                       help="Layers per virtual pipeline chunk (VPP); chunks are saved as model0, model1, ...")
    group.add_argument("--noop-layers", type=str, default=None,
                       help="Noop layer indices in the padded numbering (MindSpeed-LLM); they hold no weights")
    group.add_argument("--schedules-method", choices=["dualpipev"], default=None,
                       help="dualpipev: two mirrored chunks per pipeline rank")
    group.add_argument("--saver-transformer-impl", default="transformer_engine", choices=["local", "transformer_engine"],
                       help="Parameter naming of the target spec (TE fuses norms into the next linear)")
    group.add_argument("--naming", choices=["megatron-core", "mindspeed"], default="megatron-core",
                       help="Name profile: megatron-core GPTModel, or MindSpeed-LLM's (fused MLA down projection, ...)")
    group.add_argument("--moe-grouped-gemm", action="store_true",
                       help="Grouped experts: TEGroupedMLP names with TE, weight1/weight2 otherwise and under --naming mindspeed")
    group.add_argument("--moe-tp-extend-ep", action="store_true",
                       help="MindSpeed-LLM: experts are not split over TP; TP extends EP (needs --moe-grouped-gemm)")
    group.add_argument("--qlora-nf4", action="store_true",
                       help="QLoRA: store linear weights NF4-quantized (bitsandbytes layout), each TP shard on its own")
    group.add_argument("--mla-mm-split", action="store_true",
                       help="MindSpeed-LLM: MLA up projections as linear_qk_nope/qk_rope/kv_nope/v")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Real vocabulary size; the table is trimmed/padded from it (default: from the source)")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="Pad the vocabulary to a multiple of this times TP (default: the source's, else 128)")
    group.add_argument("--params-dtype", choices=sorted(P.DTYPES), default=None,
                       help="dtype of the saved weights (default: the source's)")
    group.add_argument("--overwrite", action="store_true", help="Replace a non-empty --save-dir")
    add_checksum_arguments(group, default_rank_file_checksum(),
                           "default blake3, 0.2 s of CPU per GB, sha256 where the blake3 package is missing: 0.55 s")
    optimizer_state.add_saver_arguments(group)


class McoreSaver:
    """State of one conversion into rank files: options checked, a rank-file plan, and a writer."""

    def __init__(self, args: argparse.Namespace, md: ModelSpec) -> None:
        self.args, self.md = args, md
        self.format = FORMATS[getattr(args, "ckpt_format", "torch")]
        self.target = target_sizes(args, md)
        self.num_experts = md.moe.num_experts if md.moe else 0
        self.mtp_layers = md.mtp_num_layers
        self.target_layout: PipelineLayout = target_layout(args, md)
        self.share: Share | None = getattr(args, "share", None)
        sent = md.share_layers  # None: the loader sends every layer
        self.sent = set(range(md.num_layers + self.mtp_layers) if sent is None else sent)
        self.format.check(args, self.share is not None)
        if self.share is not None:
            self._check_share()
        layout, (self.tp, self.pp, self.ep) = self.format.stored(self.target_layout, self.target, md)
        self.naming = getattr(args, "naming", MEGATRON_CORE)
        self.grouped = bool(getattr(args, "moe_grouped_gemm", False))
        self.tp_extend = bool(getattr(args, "moe_tp_extend_ep", False))
        self.mm_split = bool(getattr(args, "mla_mm_split", False))
        self.impl = "local" if self.naming == MINDSPEED else self.format.impl(args.saver_transformer_impl)
        self.profile = NamingProfile(self.naming, self.impl, self.grouped, self.mm_split, bool(getattr(args, "qlora_nf4", False)),
                                     self.tp_extend)
        self.mcore = self.format.mcore_target(args)
        rope_scaling.check_target(md, self.mcore.version)
        mcore_version.check_target(md, self.mcore.version)
        self.profile.check(md, self.tp, self.ep, getattr(args, "schedules_method", None) == "dualpipev")
        self.dtype = P.DTYPES[args.params_dtype] if args.params_dtype else md.params_dtype
        check_divisible(md, *self.target)
        # MindSpeed-LLM (on megatron-core 0.12) keeps its own names whatever the release.
        mtp_submodule = mcore_version.MTP_SUBMODULES[0] if self.naming == MINDSPEED else self.mcore.mtp_submodule
        self.plan = RankFilePlan(md, layout, self.tp, self.ep, self.impl, whole_mla_down=self.naming == MINDSPEED,
                                 grouped=self.grouped, tp_extend=self.tp_extend, mtp_submodule=mtp_submodule)
        self.true_vocab = args.true_vocab_size or md.true_vocab_size
        self.divisible_by = args.make_vocab_size_divisible_by or md.make_vocab_size_divisible_by or 128
        self.md = dataclasses.replace(md, make_vocab_size_divisible_by=self.divisible_by)
        self.padded_vocab: int | None = None
        # pending[pp][ep][tp][chunk] -> {name: tensor} received but not yet written (one message's worth).
        self.pending: dict[int, list[list[list[dict[str, Any]]]]] = {}
        check_target(args.save_dir, args.overwrite)
        self.summary = Summary("saver_core_ext")
        self.manifest = Manifest(chosen_checksum(args, default_rank_file_checksum()))
        self.manifest.target = {"megatron_core": self.mcore.text, "chosen_by": self.mcore.source}

    @property
    def layout(self) -> PipelineLayout:
        return self.plan.layout

    def _check_share(self) -> None:
        """A worker needs every layer of the stages it owns."""
        missing = sorted(set(layers_to_send(self.args, self.md) or ()) - self.sent)
        if missing:
            raise ConversionError(f"the loader did not send layers {missing[:5]} that worker {self.share.index} writes")

    def _owns(self, rank: tuple[int, int, int]) -> bool:
        pp_rank, ep_rank, tp_rank = rank
        return self.share is None or self.share.owns(pp_rank, ep_rank, tp_rank, (self.tp, self.pp, self.ep))

    def _slots(self, seg: Segment, ep_rank: int) -> list[dict[str, Any]]:
        """The per-TP-rank dicts of one chunk of one EP rank."""
        if seg.pp_rank not in self.pending:
            chunks = len(self.layout.rank_segments(seg.pp_rank))
            self.pending[seg.pp_rank] = [[[{} for _ in range(chunks)] for _ in range(self.tp)] for _ in range(self.ep)]
        return [chunks[seg.chunk] for chunks in self.pending[seg.pp_rank][ep_rank]]

    def _place(self, group: Group, msg: dict[str, Any], seg: Segment) -> None:
        """Pop each parameter's keys from `msg`, split for TP, and store in every EP rank."""
        for param in group.params:
            values = [P.take(msg, k) for k in param.keys]
            dtype = torch.float32 if param.fp32 else self.dtype
            shards = [cast(s, dtype) for s in self._split(values, param)]
            for ep_rank in range(self.ep):
                for per_tp, shard in zip(self._slots(seg, ep_rank), shards):
                    per_tp[group.prefix + param.name] = shard

    def _split(self, values: list[torch.Tensor], param: Param) -> list[torch.Tensor]:
        if param.rule == VOCAB:
            return split(self._pad_vocab(values[0]), COLUMN, self.tp, param.name)
        full = values[0] if len(values) == 1 else tuple(values)
        return split(full, param.rule, self.tp, param.name, joined=True)

    def _pad_vocab(self, table: torch.Tensor) -> torch.Tensor:
        if self.true_vocab is None:
            self.padded_vocab = table.shape[0]
            return table
        self.padded_vocab = padded_vocab_size(self.true_vocab, self.divisible_by, self.target[0])
        return pad_vocab(table, self.padded_vocab)

    def _receive_experts(self, reader: P.MessageReader, message: str, seg: Segment, prefix: str) -> None:
        """Routed experts arrive in one or more messages, each stacked [n, ...]; each goes to its plan slot."""
        tp = 1 if self.tp_extend else self.tp
        for first, msg in P.receive_experts(reader, message, self.md):
            stacked = {k: msg.pop(k) for k in (P.FC1_GATE_W, P.FC1_UP_W, P.FC2_W)}
            shards = {param.name: split_stacked(stacked[param.keys[0]] if len(param.keys) == 1 else
                                                tuple(stacked[k] for k in param.keys), param.rule, tp, param.name, joined=True)
                      for param in self.plan.expert_params}
            del stacked
            for offset in range(shards[self.plan.expert_params[0].name][0].shape[0]):
                slot = self.plan.expert_slot(first + offset)
                per_tp = self._slots(seg, slot.ep_rank)
                tp_ranks = range(self.tp) if slot.tp_rank is None else [slot.tp_rank]
                for name, per_rank_shards in shards.items():
                    for shard, tp_rank in zip(per_rank_shards, tp_ranks):
                        per_tp[tp_rank][prefix + name.format(expert=slot.local)] = cast(shard[offset], self.dtype)

    def _receive(self, reader: P.MessageReader, placement: Placement) -> None:
        """One message (and its experts) into the pending chunks of its segment."""
        md, seg = self.md, placement.segment
        msg = reader.get(placement.message)
        if placement.message == P.EMBEDDINGS:
            word = msg[P.WORD_EMB]
            if word.dim() != 2 or word.shape[1] != md.hidden_size:
                raise ConversionError(f"embeddings: word embeddings have shape {list(word.shape)}, hidden size is {md.hidden_size}")
        elif placement.layer is not None:
            mtp = placement.layer >= md.num_layers
            P.check_shapes(msg, P.mtp_shapes(md) if mtp else P.layer_shapes(md, placement.layer), placement.message)
        elif placement.message == P.FINAL_NORM:
            P.check_shapes(msg, P.global_shapes(md, 0)[P.FINAL_NORM], P.FINAL_NORM)
        for group in placement.groups:
            self._place(group, msg, seg)
        reader.finish(msg)
        if placement.experts is not None:
            self._receive_experts(reader, placement.message, seg, placement.experts)

    def _flush(self, pp_rank: int) -> None:
        """Hand what a pipeline rank has received to the writer and drop it from memory."""
        for ep_rank, per_tp in enumerate(self.pending.get(pp_rank, [])):
            for tp_rank, chunks in enumerate(per_tp):
                for index, chunk in enumerate(chunks):
                    if chunk:
                        self.writer.write((pp_rank, ep_rank, tp_rank), index, len(chunks), chunk)
                        chunk.clear()

    def _close_stage(self, pp_rank: int) -> None:
        self._flush(pp_rank)
        self.pending.pop(pp_rank, None)
        self.writer.close_stage(pp_rank)

    def _args_namespace(self) -> argparse.Namespace:
        tp, pp, ep = self.target
        ns = megatron_args(self.md, tp=tp, pp=pp, ep=ep, padded_vocab_size=self.padded_vocab,
                           transformer_impl=self.impl, params_dtype=self.dtype, layout=self.target_layout,
                           num_layer_list=parse_layer_list(self.args.num_layer_list),
                           layers_per_virtual_stage=self.args.num_layers_per_virtual_pipeline_stage,
                           schedules_method=getattr(self.args, "schedules_method", None), naming=self.naming,
                           moe_grouped_gemm=self.grouped, moe_tp_extend_ep=self.tp_extend, mla_mm_split=self.mm_split)
        ns.ckpt_format = self.format.name
        ns.target_mcore_version = self.mcore.text
        return ns

    def receive(self, reader: P.MessageReader, root: Path) -> None:
        """Every message into rank files under `root`, written as each layer arrives; a stage's files
        are closed after its last layer. On failure the open files are abandoned."""
        self.writer = self.format(root, (self.tp, self.pp, self.ep), self._args_namespace, self.md.iteration, self.md,
                                  self.profile, self._owns, self.manifest, self.summary)
        try:
            self._receive_all(reader)
        except BaseException:
            self.writer.abandon()
            raise

    def _receive_all(self, reader: P.MessageReader) -> None:
        plan, md = self.plan, self.md
        stage_end = {self.layout.last_layer_of_rank(r): r for r in range(self.pp) if r != plan.last.pp_rank}
        tied_after = P.OUTPUT_LAYER if md.output_layer else P.FINAL_NORM
        word: list[torch.Tensor] = []  # the word embeddings' TP shards, for the last stage's tied copies
        placements = list(plan.placements(self.sent))
        for placement in progress(placements, len(placements), "saver_core_ext"):
            self._receive(reader, placement)
            if placement.message == P.EMBEDDINGS:
                word = [t[WORD_EMBEDDINGS] for t in self._slots(placement.segment, 0)]
            elif placement.message == tied_after and plan.tied_copies():
                for ep_rank in range(self.ep):
                    for per_tp, shard in zip(self._slots(plan.last, ep_rank), word):
                        per_tp.update(dict.fromkeys(plan.tied_copies(), shard))
            if placement.layer is not None and stage_end.get(placement.layer) == placement.segment.pp_rank:
                self._close_stage(placement.segment.pp_rank)
            else:
                self._flush(placement.segment.pp_rank)
        self.optimizer = optimizer_state.receive_message(P.receive_end(reader), reader)
        self._close_stage(plan.last.pp_rank)
        for rank in sorted(self.pending):
            self._close_stage(rank)
        self.writer.close()
        self.manifest.wait_for_files()  # the rank files are written in the background: complete before anything else


def save(queue: Any, args: argparse.Namespace) -> None:
    """The saver body: metadata first, then all messages, then an atomic commit."""
    reader = P.MessageReader(queue, getattr(args, "checking", True))
    md = P.receive_spec(reader)
    saver = McoreSaver(args, md)
    iteration = md.iteration if md.iteration is not None else "release"
    if saver.share is not None:  # one of several workers: the driver merges and commits
        root = saver.share.root
        saver.receive(reader, root / iteration_dir_name(iteration))
        if saver.share.index == 0:
            write_tracker(root, iteration)
        saver.manifest.write_part(root, saver.share.index)
        target = root
    else:
        with StagedDir(args.save_dir, args.overwrite) as staged:
            saver.receive(reader, staged.path / iteration_dir_name(iteration))
            optimizer_state.save_with(saver, staged.path)
            write_tracker(staged.path, iteration)
            saver.manifest.write(staged.path)
            target = staged.commit()
    saver.summary.notes.append(
        saver.format.describe(saver.target, saver.layout, saver.naming) + f" impl {saver.impl} "
        f"dtype {str(saver.dtype).removeprefix('torch.')} padded vocab {saver.padded_vocab}"
    )
    saver.summary.notes.append(f"names of megatron-core {saver.mcore.text} ({saver.mcore.source})")
    flags, warnings = rope_scaling.training_flags(md, saver.mcore.version)
    if flags:  # Megatron-LM's --use-checkpoint-args does not copy MLA's RoPE/YaRN fields
        saver.summary.notes.append(f"MLA RoPE: pass {' '.join(flags)} to Megatron-LM training (--use-checkpoint-args does not copy them)")
    saver.summary.notes += [f"warning: {w}" for w in warnings]
    saver.summary.print(target)
