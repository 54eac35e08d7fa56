"""Receive protocol messages and write Megatron-Core legacy `torch` rank files at a target layout.

Tensors are split as they arrive and kept only until their pipeline rank's file is complete;
each rank file is then written and freed. No model is ever built.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from . import protocol as P
from .errors import ConversionError
from .mcore_names import EMBEDDING_PARAMS, FINAL_NORM_PARAMS, LAYER_PREFIX, OUTPUT_PARAMS, VOCAB, Param, layer_params
from .megatron_io import iteration_dir_name, megatron_args, rank_dir_name, save_rank_file, write_tracker
from .pipeline import PipelineLayout, make_layout, parse_layer_list
from .runtime import Summary, progress
from .sharding import COLUMN, owned, pad_vocab, padded_vocab_size, split
from .staging import StagedDir, check_target


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--target-tensor-parallel-size", type=int, default=None,
                       help="Target TP size (default: the source's, else 1)")
    group.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                       help="Target PP size (default: the source's, else 1)")
    group.add_argument("--target-expert-parallel-size", type=int, default=1, help="Target EP size (MoE models)")
    group.add_argument("--num-layer-list", type=str, default=None,
                       help="Layers per pipeline stage, e.g. 4,3,3 (uneven PP; exclusive with VPP)")
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                       help="Layers per virtual pipeline chunk (VPP); chunks are saved as model0, model1, ...")
    group.add_argument("--saver-transformer-impl", default="transformer_engine", choices=["local", "transformer_engine"],
                       help="Parameter naming of the target spec (TE fuses norms into the next linear)")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Real vocabulary size; the table is trimmed/padded from it (default: from the source)")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="Pad the vocabulary to a multiple of this times TP (default: the source's, else 128)")
    group.add_argument("--params-dtype", choices=sorted(P.DTYPES), default=None,
                       help="dtype of the saved weights (default: the source's)")
    group.add_argument("--overwrite", action="store_true", help="Replace a non-empty --save-dir")


class McoreSaver:
    """State of one conversion into rank files."""

    def __init__(self, args: argparse.Namespace, md: argparse.Namespace) -> None:
        self.args, self.md = args, md
        self.tp = args.target_tensor_parallel_size or getattr(md, "previous_tensor_parallel_size", 1) or 1
        self.pp = args.target_pipeline_parallel_size or getattr(md, "previous_pipeline_parallel_size", 1) or 1
        if getattr(args, "target_expert_parallel_size", 1) not in (None, 1) and not md.num_experts:
            raise ConversionError("--target-expert-parallel-size > 1 needs a model with experts")
        layer_list = parse_layer_list(args.num_layer_list)
        self.layout: PipelineLayout = make_layout(md.num_layers, self.pp, layer_list, args.num_layers_per_virtual_pipeline_stage)
        self.impl = args.saver_transformer_impl
        self.dtype = P.DTYPES[args.params_dtype] if args.params_dtype else md.params_dtype
        md.learned_absolute = md.position_embedding_type == "learned_absolute"
        self._check_divisibility()
        self.true_vocab = args.true_vocab_size or md.true_vocab_size
        self.divisible_by = args.make_vocab_size_divisible_by or md.make_vocab_size_divisible_by or 128
        md.make_vocab_size_divisible_by = self.divisible_by
        self.padded_vocab: int | None = None
        self.layer_table = [p for p in layer_params(self.impl) if p.applies(md)]
        self.expected = P.layer_shapes(md)
        # state[pp][tp][chunk] -> {name: tensor}; dropped once the rank file is written.
        self.state: dict[int, list[list[dict[str, torch.Tensor]]]] = {}
        self.word_shards: list[torch.Tensor] | None = None
        check_target(args.save_dir, args.overwrite)
        self.summary = Summary("saver_core_ext")

    def _check_divisibility(self) -> None:
        md, tp = self.md, self.tp
        for what, size in (("num_attention_heads", md.num_attention_heads), ("num_query_groups", md.num_query_groups),
                           ("ffn_hidden_size", md.ffn_hidden_size)):
            if size % tp:
                raise ConversionError(f"--target-tensor-parallel-size {tp} does not divide {what} {size}")

    def _slot(self, pp_rank: int, tp_rank: int, chunk: int) -> dict[str, torch.Tensor]:
        if pp_rank not in self.state:
            chunks = len(self.layout.rank_segments(pp_rank))
            self.state[pp_rank] = [[{} for _ in range(chunks)] for _ in range(self.tp)]
        return self.state[pp_rank][tp_rank][chunk]

    def _place(self, params: tuple[Param, ...] | list[Param], msg: dict[str, Any], pp_rank: int, chunk: int,
               prefix: str = "") -> None:
        for param in params:
            if not param.applies(self.md):
                continue
            values = [P.take(msg, k) for k in param.keys]
            shards = self._split(values, param)
            for tp_rank, shard in enumerate(shards):
                self._slot(pp_rank, tp_rank, chunk)[prefix + param.name] = owned(shard.to(self.dtype))

    def _split(self, values: list[torch.Tensor], param: Param) -> list[torch.Tensor]:
        if param.rule == VOCAB:
            return split(self._pad_vocab(values[0]), COLUMN, self.tp, param.name)
        full = values[0] if len(values) == 1 else tuple(values)
        return split(full, param.rule, self.tp, param.name)

    def _pad_vocab(self, table: torch.Tensor) -> torch.Tensor:
        if self.true_vocab is None:
            self.padded_vocab = table.shape[0]
            return table
        self.padded_vocab = padded_vocab_size(self.true_vocab, self.divisible_by, self.tp)
        return pad_vocab(table, self.padded_vocab)

    def _write_rank(self, pp_rank: int, root: Path) -> None:
        ns = megatron_args(self.md, tp=self.tp, pp=self.pp, padded_vocab_size=self.padded_vocab, transformer_impl=self.impl,
                           params_dtype=self.dtype, num_layer_list=parse_layer_list(self.args.num_layer_list),
                           layers_per_virtual_stage=self.args.num_layers_per_virtual_pipeline_stage)
        for tp_rank, chunks in enumerate(self.state.pop(pp_rank)):
            path = root / rank_dir_name(tp_rank, pp_rank, 0, self.pp, 1) / "model_optim_rng.pt"
            self.summary.add_file(save_rank_file(path, chunks, ns, self.md.iteration))

    def receive(self, reader: P.MessageReader, root: Path) -> None:
        md, last = self.md, self.pp - 1
        first_seg = self.layout.rank_segments(0)[0]
        msg = reader.get(P.EMBEDDINGS)
        word = msg[P.WORD_EMB]
        if word.dim() != 2 or word.shape[1] != md.hidden_size:
            raise ConversionError(f"embeddings: word embeddings have shape {list(word.shape)}, hidden size is {md.hidden_size}")
        self._place(EMBEDDING_PARAMS, msg, 0, first_seg.chunk)
        reader.finish(msg)
        if not md.output_layer and self.pp > 1:
            self.word_shards = [self.state[0][t][first_seg.chunk]["embedding.word_embeddings.weight"] for t in range(self.tp)]

        for layer in progress(range(md.num_layers), md.num_layers, "saver_core_ext"):
            msg = reader.get(P.layer_message(layer))
            P.check_shapes(msg, self.expected, P.layer_message(layer))
            seg, local = self.layout.locate(layer)
            self._place(self.layer_table, msg, seg.pp_rank, seg.chunk, LAYER_PREFIX.format(layer=local))
            reader.finish(msg)
            if seg.pp_rank != last and layer == self.layout.last_layer_of_rank(seg.pp_rank):
                self._write_rank(seg.pp_rank, root)

        last_chunk = self.layout.rank_segments(last)[-1].chunk
        msg = reader.get(P.FINAL_NORM)
        if tuple(msg["weight"].shape) != (md.hidden_size,):
            raise ConversionError(f"final norm: weight has shape {list(msg['weight'].shape)}, expected [{md.hidden_size}]")
        self._place(FINAL_NORM_PARAMS, msg, last, last_chunk)
        reader.finish(msg)
        if md.output_layer:
            msg = reader.get(P.OUTPUT_LAYER)
            self._place(OUTPUT_PARAMS, msg, last, last_chunk)
            reader.finish(msg)
        elif self.word_shards is not None:
            for tp_rank, shard in enumerate(self.word_shards):
                self._slot(last, tp_rank, last_chunk)["output_layer.weight"] = shard
        end = reader.get_raw()
        if end != P.DONE:
            name = end.get("name") if isinstance(end, dict) else end
            raise ConversionError(f"unsupported message '{name}' (dense GPT models only carry embeddings, layers, final norm, output layer)")
        self._write_rank(last, root)


def save(queue: Any, args: argparse.Namespace) -> None:
    """The saver body: metadata first, then all messages, then an atomic commit."""
    reader = P.MessageReader(queue, getattr(args, "checking", True))
    md = reader.get_raw()
    if not isinstance(md, argparse.Namespace):
        raise ConversionError("the first message must be the metadata Namespace")
    md = P.normalize_metadata(md)
    saver = McoreSaver(args, md)
    staged = StagedDir(args.save_dir, args.overwrite)
    try:
        iteration = md.iteration if md.iteration is not None else "release"
        root = staged.path / iteration_dir_name(iteration)
        saver.receive(reader, root)
        write_tracker(staged.path, iteration)
        target = staged.commit()
    except BaseException:
        staged.discard()
        raise
    saver.summary.notes.append(
        f"TP{saver.tp} PP{saver.pp} chunks/rank {saver.layout.num_chunks} layers/stage {saver.layout.layers_per_stage()} "
        f"impl {saver.impl} dtype {str(saver.dtype).removeprefix('torch.')} padded vocab {saver.padded_vocab}"
    )
    saver.summary.print(target)
