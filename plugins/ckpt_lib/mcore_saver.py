"""Receive protocol messages and write Megatron-Core legacy `torch` rank files at a target layout.

Tensors are split as they arrive and written into their rank files after each message (layer),
so memory holds about one layer whatever the size of a pipeline stage; a rank's files are closed
when its last layer has arrived. No model is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import mcore_version, optimizer_state, rope_scaling
from . import protocol as P
from .errors import ConversionError
from .manifest import Manifest, describe
from .mcore_names import (
    EMBEDDING_PARAMS,
    FINAL_NORM_PARAMS,
    LAYER_PREFIX,
    MTP_LAYER_PREFIX,
    MTP_PARAMS,
    MTP_PREFIX,
    OUTPUT_PARAMS,
    VOCAB,
    Param,
    expert_params,
    layer_params,
)
from .megatron_io import RankFileWriter, iteration_dir_name, megatron_args, raise_open_file_limit, rank_dir_name, write_tracker
from .mindspeed import group_experts, to_mindspeed
from .pipeline import PipelineLayout, Segment, make_layout, parse_layer_list
from .qlora import quantize_nf4
from .runtime import Summary, progress
from .sharding import COLUMN, materialize, pad_vocab, padded_vocab_size, split, split_stacked
from .shares import Share, layers_to_send, target_layout, target_sizes
from .staging import StagedDir, check_target


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
    group.add_argument("--no-checksums", action="store_true",
                       help="Leave sha256 out of conversion_manifest.json (hashed as written, beside the conversion: 0.7 s of CPU per GB of output)")
    optimizer_state.add_saver_arguments(group)


class McoreSaver:
    """State of one conversion into rank files."""

    def __init__(self, args: argparse.Namespace, md: argparse.Namespace) -> None:
        self.args, self.md = args, md
        self.tp, self.pp, self.ep = target_sizes(args, md)
        # torch_dist stores whole tensors: split at TP/PP/EP 1, record the target sizes in args.
        self.torch_dist = getattr(args, "ckpt_format", "torch") == "torch_dist"
        self.target = (self.tp, self.pp, self.ep)
        self.dist_writer: Any = None  # a torch_dist.TorchDistWriter once the vocabulary size is known
        self.num_experts = md.num_experts or 0
        self.mtp_layers = getattr(md, "mtp_num_layers", 0) or 0
        noop = parse_layer_list(getattr(args, "noop_layers", None)) or []
        self.layout: PipelineLayout = target_layout(args, md)
        self.target_layout = self.layout
        self.share: Share | None = getattr(args, "share", None)
        sent = getattr(md, "share_layers", None)  # None: the loader sends every layer
        self.sent = set(range(md.num_layers + self.mtp_layers) if sent is None else sent)
        if self.share is not None:
            self._check_share()
        if self.torch_dist:
            self._check_torch_dist(noop)
            self.tp = self.pp = self.ep = 1
            self.layout = make_layout(md.num_layers, 1, None, None, [], False)
        self.naming = getattr(args, "naming", "megatron-core")
        self.grouped = bool(getattr(args, "moe_grouped_gemm", False))
        self.tp_extend = bool(getattr(args, "moe_tp_extend_ep", False))
        self.mm_split = bool(getattr(args, "mla_mm_split", False))
        self.impl = "local" if self.naming == "mindspeed" or self.torch_dist else args.saver_transformer_impl
        self.mcore = self._target_mcore()
        rope_scaling.check_target(md, self.mcore.version)
        mcore_version.check_target(md, self.mcore.version)
        # MindSpeed-LLM (on megatron-core 0.12) keeps its own names whatever the release.
        self.mtp_submodule = mcore_version.MTP_SUBMODULES[0] if self.naming == "mindspeed" else self.mcore.mtp_submodule
        self._check_profile(getattr(args, "schedules_method", None) == "dualpipev")
        self.dtype = P.DTYPES[args.params_dtype] if args.params_dtype else md.params_dtype
        md.learned_absolute = md.position_embedding_type == "learned_absolute"
        self._check_divisibility()
        self.true_vocab = args.true_vocab_size or md.true_vocab_size
        self.divisible_by = args.make_vocab_size_divisible_by or md.make_vocab_size_divisible_by or 128
        md.make_vocab_size_divisible_by = self.divisible_by
        self.padded_vocab: int | None = None
        self.first, self.last = self.layout.first_segment(), self.layout.last_segment()
        self.last_layer = {r: self.layout.last_layer_of_rank(r) for r in range(self.pp)}
        # state[pp][ep][tp][chunk] -> {name: tensor} received but not yet written (one message's worth).
        self.state: dict[int, list[list[list[dict[str, torch.Tensor]]]]] = {}
        self.writers: dict[tuple[int, int, int], RankFileWriter] = {}
        raise_open_file_limit(self.tp * self.pp * self.ep)
        self.word_shards: list[torch.Tensor] | None = None
        self.copies: list[str] = []
        check_target(args.save_dir, args.overwrite)
        self.summary = Summary("saver_core_ext")
        self.manifest = Manifest(not getattr(args, "no_checksums", False))
        self.manifest.target = {"megatron_core": self.mcore.text, "chosen_by": self.mcore.source}

    def _check_share(self) -> None:
        """A worker writes legacy rank files, and needs every layer of the stages it owns."""
        if self.torch_dist:
            raise ConversionError("--ckpt-format torch_dist is written by one process; drop --workers / torchrun")
        missing = sorted(set(layers_to_send(self.args, self.md) or ()) - self.sent)
        if missing:
            raise ConversionError(f"the loader did not send layers {missing[:5]} that worker {self.share.index} writes")

    def _owns(self, pp_rank: int, ep_rank: int, tp_rank: int) -> bool:
        return self.share is None or self.share.owns(pp_rank, ep_rank, tp_rank, (self.tp, self.pp, self.ep))

    def _target_mcore(self) -> mcore_version.Target:
        """The megatron-core release whose names the files carry. torch_dist keys are the same in every
        release, but are looked up by the names of the megatron-core that writes them (imported here)."""
        if self.torch_dist:
            from megatron.core import package_info

            return mcore_version.Target(mcore_version.parse(package_info.__version__), "megatron-core writing torch_dist")
        return mcore_version.resolve(getattr(self.args, "target_mcore_version", None), getattr(self.args, "megatron_path", None))

    def _check_torch_dist(self, noop: list[int]) -> None:
        """torch_dist is megatron-core's format: its names, no MindSpeed-only layouts."""
        a = self.args
        for flag, used in (("--naming mindspeed", getattr(a, "naming", "megatron-core") == "mindspeed"),
                           ("--noop-layers", bool(noop)), ("--schedules-method dualpipev", getattr(a, "schedules_method", None) == "dualpipev"),
                           ("--moe-grouped-gemm", bool(getattr(a, "moe_grouped_gemm", False))),
                           ("--qlora-nf4", bool(getattr(a, "qlora_nf4", False)))):
            if used:
                raise ConversionError(f"--ckpt-format torch_dist cannot be combined with {flag} (use --ckpt-format torch)")

    def _check_divisibility(self) -> None:
        md, (tp, _, _) = self.md, self.target
        sizes = [("num_attention_heads", md.num_attention_heads), ("ffn_hidden_size", md.ffn_hidden_size)]
        if not getattr(md, "multi_latent_attention", False):
            sizes.append(("num_query_groups", md.num_query_groups))
        if self.num_experts:
            sizes += [("moe_ffn_hidden_size", md.moe_ffn_hidden_size),
                      ("moe_shared_expert_intermediate_size", md.moe_shared_expert_intermediate_size)]
        for what, size in sizes:
            if size is not None and size % tp:  # None: no shared expert
                raise ConversionError(f"--target-tensor-parallel-size {tp} does not divide {what} {size}")
        ep = self.target[2]
        if ep > 1 and not self.num_experts:
            raise ConversionError("--target-expert-parallel-size > 1 needs a model with experts")
        if self.num_experts % ep:
            raise ConversionError(f"--target-expert-parallel-size {ep} does not divide the {self.num_experts} experts")

    def _check_profile(self, dualpipev: bool) -> None:
        """The seeds' exclusions between MindSpeed-LLM options."""
        mindspeed = self.naming == "mindspeed"
        if (self.mm_split or self.tp_extend) and not mindspeed:
            raise ConversionError("--mla-mm-split and --moe-tp-extend-ep are MindSpeed-LLM layouts: add --naming mindspeed")
        if self.mm_split and not getattr(self.md, "multi_latent_attention", False):
            raise ConversionError("--mla-mm-split needs an MLA model")
        if mindspeed and getattr(self.md, "multi_latent_attention", False) and not self.md.q_lora_rank:
            raise ConversionError("--naming mindspeed: MindSpeed-LLM's layout of MLA without q_lora_rank (a plain query "
                                  "projection) is not known here; write megatron-core names")
        if self.tp_extend and not self.grouped:
            raise ConversionError("--moe-tp-extend-ep needs --moe-grouped-gemm")
        if (self.grouped or self.tp_extend) and not self.num_experts:
            raise ConversionError("--moe-grouped-gemm / --moe-tp-extend-ep need a model with experts")
        if self.tp_extend and self.num_experts % (self.ep * self.tp):
            raise ConversionError(f"--moe-tp-extend-ep: EP x TP = {self.ep * self.tp} does not divide the {self.num_experts} experts")
        if mindspeed and dualpipev and self.tp > 1 and not self.tp_extend:
            raise ConversionError("--schedules-method dualpipev with TP > 1 needs --moe-tp-extend-ep (MindSpeed-LLM)")

    def _slots(self, seg: Segment, ep_ranks: Iterable[int]) -> list[list[dict[str, torch.Tensor]]]:
        """For each EP rank asked, the per-TP-rank dicts of one chunk."""
        if seg.pp_rank not in self.state:
            chunks = len(self.layout.rank_segments(seg.pp_rank))
            self.state[seg.pp_rank] = [[[{} for _ in range(chunks)] for _ in range(self.tp)] for _ in range(self.ep)]
        return [[chunks[seg.chunk] for chunks in self.state[seg.pp_rank][e]] for e in ep_ranks]

    def _place(self, params: Iterable[Param], msg: dict[str, Any], seg: Segment, prefix: str = "",
               ep_ranks: Iterable[int] | None = None, only_tp: int | None = None, **fmt: int) -> None:
        """Pop each parameter's keys from `msg`, split for TP and store in every EP rank asked;
        with `only_tp`, store the unsplit tensor in that TP rank only (--moe-tp-extend-ep)."""
        targets = self._slots(seg, range(self.ep) if ep_ranks is None else ep_ranks)
        for param in params:
            if not param.applies(self.md):
                continue
            values = [P.take(msg, k) for k in param.keys]
            dtype = torch.float32 if param.fp32 else self.dtype
            shards = [s.to(dtype) for s in self._split(values, param, 1 if only_tp is not None else self.tp)]
            name = prefix + param.name.format(**fmt)
            for per_tp in targets:
                if only_tp is not None:
                    per_tp[only_tp][name] = shards[0]
                    continue
                for tp_rank, shard in enumerate(shards):
                    per_tp[tp_rank][name] = shard

    def _split(self, values: list[torch.Tensor], param: Param, tp: int) -> list[torch.Tensor]:
        if param.rule == VOCAB:
            return split(self._pad_vocab(values[0]), COLUMN, tp, param.name)
        full = values[0] if len(values) == 1 else tuple(values)
        return split(full, param.rule, tp, param.name, joined=True)

    def _pad_vocab(self, table: torch.Tensor) -> torch.Tensor:
        if self.true_vocab is None:
            self.padded_vocab = table.shape[0]
            return table
        self.padded_vocab = padded_vocab_size(self.true_vocab, self.divisible_by, self.target[0])
        return pad_vocab(table, self.padded_vocab)

    def _receive_experts(self, reader: P.MessageReader, message: str, seg: Segment, prefix: str) -> None:
        """Routed experts arrive in one or more messages; expert e goes to EP rank e // (E / EP)."""
        per_rank = self.num_experts // self.ep
        per_bucket = self.num_experts // (self.ep * self.tp)
        table = expert_params(self.impl, self.grouped)
        tp = 1 if self.tp_extend else self.tp
        for first, msg in P.receive_experts(reader, message, self.md):
            stacked = {k: msg.pop(k).to(self.dtype) for k in (P.FC1_GATE_W, P.FC1_UP_W, P.FC2_W)}
            shards = {param.name: split_stacked(stacked[param.keys[0]] if len(param.keys) == 1 else
                                                tuple(stacked[k] for k in param.keys), param.rule, tp, param.name, joined=True)
                      for param in table}
            del stacked
            for offset in range(shards[table[0].name][0].shape[0]):
                expert = first + offset
                if self.tp_extend:  # bucket b = ep * TP + tp holds whole experts
                    ep_rank, tp_rank = divmod(expert // per_bucket, self.tp)
                    local, ranks = expert % per_bucket, [tp_rank]
                else:
                    ep_rank, local, ranks = expert // per_rank, expert % per_rank, list(range(self.tp))
                per_tp = self._slots(seg, [ep_rank])[0]
                for name, per_rank_shards in shards.items():
                    for shard_index, tp_rank in enumerate(ranks):
                        per_tp[tp_rank][prefix + name.format(expert=local)] = per_rank_shards[shard_index][offset]

    def _receive_layer(self, reader: P.MessageReader, message: str, layer: int, seg: Segment, prefix: str,
                       extra: tuple[Param, ...] = (), extra_prefix: str = "") -> None:
        msg = reader.get(message)
        moe = P.is_moe_layer(self.md, layer)
        P.check_shapes(msg, P.mtp_shapes(self.md) if extra else P.layer_shapes(self.md, layer), message)
        if extra:
            self._place(extra, msg, seg, extra_prefix)
        self._place(layer_params(self.impl, self.md, moe, self.naming == "mindspeed"), msg, seg, prefix)
        reader.finish(msg)
        if moe:
            self._receive_experts(reader, message, seg, prefix)

    def _rewrite(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The target profile's names and packing; each rewrite works within one layer. Shards stay
        views and `Joined` pairs (copied once, into the rank file's buffer) unless a rewrite computes."""
        if self.naming == "mindspeed" or self.grouped or getattr(self.args, "qlora_nf4", False):
            chunk = {name: materialize(value) for name, value in chunk.items()}
        if self.naming == "mindspeed":
            chunk = to_mindspeed(chunk, self.md, self.grouped, self.mm_split)
        elif self.grouped and self.impl == "local":
            chunk = group_experts(chunk)
        if getattr(self.args, "qlora_nf4", False):
            chunk = quantize_nf4(chunk)
        return chunk

    def _flush(self, pp_rank: int, root: Path) -> None:
        """Write what a pipeline rank has received into its rank files and drop it from memory."""
        if self.torch_dist:
            if self.dist_writer is None:
                from .torch_dist import TorchDistWriter

                self.dist_writer = TorchDistWriter(self._args_namespace(), self.md.iteration, root)
            for chunk in self.state.get(pp_rank, [[[{}]]])[0][0]:
                self.manifest.tensors.setdefault(root.name, {}).update(describe(chunk))
                for name, tensor in chunk.items():
                    self.dist_writer.add(name, materialize(tensor).contiguous())
                chunk.clear()
            return
        for ep_rank, per_tp in enumerate(self.state.get(pp_rank, [])):
            for tp_rank, chunks in enumerate(per_tp):
                for index, chunk in enumerate(chunks):
                    if not chunk or not self._owns(pp_rank, ep_rank, tp_rank):
                        chunk.clear()
                        continue
                    key = (pp_rank, ep_rank, tp_rank)
                    if key not in self.writers:
                        path = root / rank_dir_name(tp_rank, pp_rank, ep_rank, self.pp, self.ep) / "model_optim_rng.pt"
                        self.writers[key] = RankFileWriter(path, len(chunks), self.manifest.checksums)
                    for name, tensor in self._rewrite(chunk).items():
                        self.writers[key].add(index, name, tensor)
                    self.writers[key].park()
                    chunk.clear()

    def _write_rank(self, pp_rank: int, root: Path) -> None:
        """Flush and close every rank file of one pipeline rank."""
        self._flush(pp_rank, root)
        self.state.pop(pp_rank, None)
        if self.torch_dist:
            return
        for key in sorted(k for k in self.writers if k[0] == pp_rank):
            writer = self.writers.pop(key)
            self.summary.add_file(writer.close(self._args_namespace(), self.md.iteration))
            self.manifest.record(str(writer.path.relative_to(root.parent)), writer.described())
            self.manifest.checksum_from(writer.path, writer.finished)

    def write_torch_dist(self, root: Path) -> None:
        """Finish the torch_dist checkpoint (see torch_dist.TorchDistWriter)."""
        self.dist_writer.close()
        for f in root.rglob("*"):
            if f.is_file():
                self.summary.add_file(f.stat().st_size)

    def _args_namespace(self) -> argparse.Namespace:
        tp, pp, ep = self.target
        ns = megatron_args(self.md, tp=tp, pp=pp, ep=ep, padded_vocab_size=self.padded_vocab,
                           transformer_impl=self.impl, params_dtype=self.dtype, layout=self.target_layout,
                           num_layer_list=parse_layer_list(self.args.num_layer_list),
                           layers_per_virtual_stage=self.args.num_layers_per_virtual_pipeline_stage,
                           schedules_method=getattr(self.args, "schedules_method", None), naming=self.naming,
                           moe_grouped_gemm=self.grouped, moe_tp_extend_ep=self.tp_extend, mla_mm_split=self.mm_split)
        ns.ckpt_format = "torch_dist" if self.torch_dist else "torch"
        ns.target_mcore_version = self.mcore.text
        return ns

    def receive(self, reader: P.MessageReader, root: Path) -> None:
        """Every message into rank files under `root`. On failure the open files are abandoned: a file
        caught between two records would otherwise keep a shared write buffer for the life of the
        process (an in-process conversion runs on after a failed one) and its descriptor open."""
        try:
            self._receive(reader, root)
        except BaseException:
            for writer in self.writers.values():
                writer.abandon()
            raise

    def _receive(self, reader: P.MessageReader, root: Path) -> None:
        md, first, last = self.md, self.first, self.last
        msg = reader.get(P.EMBEDDINGS)
        word = msg[P.WORD_EMB]
        if word.dim() != 2 or word.shape[1] != md.hidden_size:
            raise ConversionError(f"embeddings: word embeddings have shape {list(word.shape)}, hidden size is {md.hidden_size}")
        self._place(EMBEDDING_PARAMS, msg, first)
        reader.finish(msg)
        # The last stage needs its own copy of the embeddings for a tied output layer or for MTP.
        self.copies = [n for n, needed in (("output_layer.weight", not md.output_layer),
                                           ("embedding.word_embeddings.weight", self.mtp_layers > 0)) if needed]
        if self.layout.split_ends() and self.copies:
            self.word_shards = [t["embedding.word_embeddings.weight"] for t in self._slots(first, [0])[0]]
        self._flush(first.pp_rank, root)

        layers = [layer for layer in range(md.num_layers) if layer in self.sent]
        for layer in progress(layers, len(layers), "saver_core_ext"):
            seg, local = self.layout.locate_real(layer)
            self._receive_layer(reader, P.layer_message(layer), layer, seg, LAYER_PREFIX.format(layer=local))
            if seg.pp_rank != last.pp_rank and layer == self.last_layer[seg.pp_rank]:
                self._write_rank(seg.pp_rank, root)
            else:
                self._flush(seg.pp_rank, root)

        msg = reader.get(P.FINAL_NORM)
        P.check_shapes(msg, P.global_shapes(md, 0)[P.FINAL_NORM], P.FINAL_NORM)
        self._place(FINAL_NORM_PARAMS, msg, last)
        reader.finish(msg)
        if md.output_layer:
            msg = reader.get(P.OUTPUT_LAYER)
            self._place(OUTPUT_PARAMS, msg, last)
            reader.finish(msg)
        if self.word_shards is not None:
            for per_tp in self._slots(last, range(self.ep)):
                for tp_rank, shard in enumerate(self.word_shards):
                    per_tp[tp_rank].update(dict.fromkeys(self.copies, shard))
        for k in (k for k in range(self.mtp_layers) if md.num_layers + k in self.sent):
            self._receive_layer(reader, P.mtp_message(k), md.num_layers + k, last,
                                MTP_LAYER_PREFIX.format(index=k, submodule=self.mtp_submodule), MTP_PARAMS, MTP_PREFIX.format(index=k))
        self.optimizer = optimizer_state.receive_message(P.receive_end(reader), reader)
        self._write_rank(last.pp_rank, root)
        for rank in sorted(self.state):
            self._write_rank(rank, root)
        if self.torch_dist:
            self.write_torch_dist(root)
        self.manifest.wait_for_files()  # the rank files are written in the background: complete before anything else


def save(queue: Any, args: argparse.Namespace) -> None:
    """The saver body: metadata first, then all messages, then an atomic commit."""
    reader = P.MessageReader(queue, getattr(args, "checking", True))
    md = P.receive_metadata(reader)
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
        (f"torch_dist (layout free; args say TP{saver.target[0]} PP{saver.target[1]} EP{saver.target[2]}) " if saver.torch_dist else
         f"{saver.naming} TP{saver.tp} PP{saver.pp} EP{saver.ep} chunks/rank {saver.layout.num_chunks} "
         f"layers/stage {saver.layout.layers_per_stage()} ") + f"impl {saver.impl} "
        f"dtype {str(saver.dtype).removeprefix('torch.')} padded vocab {saver.padded_vocab}"
    )
    saver.summary.notes.append(f"names of megatron-core {saver.mcore.text} ({saver.mcore.source})")
    flags, warnings = rope_scaling.training_flags(md, saver.mcore.version)
    if flags:  # Megatron-LM's --use-checkpoint-args does not copy MLA's RoPE/YaRN fields
        saver.summary.notes.append(f"MLA RoPE: pass {' '.join(flags)} to Megatron-LM training (--use-checkpoint-args does not copy them)")
    saver.summary.notes += [f"warning: {w}" for w in warnings]
    saver.summary.print(target)
