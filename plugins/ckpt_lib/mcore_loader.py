"""Megatron-Core legacy `torch` checkpoints of any TP/PP/VPP layout -> protocol messages.

The layout is detected from the files (rank directories, `model`/`model0..` chunks, layer
indices), so checkpoints written by Megatron-LM itself, by MindSpeed-LLM or by our saver all
load. Every tensor is either mapped or reported before the first message is sent.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from . import protocol as P
from .errors import ConversionError
from .mcore_names import EMBEDDING_PARAMS, FINAL_NORM_PARAMS, LAYER_PREFIX, OUTPUT_PARAMS, VOCAB, Param, detect_impl, layer_params
from .megatron_io import find_iteration_dir, load_rank_file, rank_grid
from .pipeline import PipelineLayout, Segment, layout_from_counts
from .runtime import progress
from .sharding import COLUMN, gather

LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--source-tensor-parallel-size", type=int, default=None, help="Checked against the files")
    group.add_argument("--source-pipeline-parallel-size", type=int, default=None, help="Checked against the files")
    group.add_argument("--loader-transformer-impl", choices=["local", "transformer_engine"], default=None,
                       help="Checked against the files (detected from the norm names)")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Real vocabulary size (default: recorded in the checkpoint's args, else keep padding)")


class RankFiles:
    """Lazily memory-mapped rank files of one iteration, with the names each chunk has left."""

    def __init__(self, grid: dict[tuple[int, int, int], Path]) -> None:
        self.grid = grid
        self.tp = 1 + max(k[0] for k in grid)
        self.pp = 1 + max(k[1] for k in grid)
        self.ep = 1 + max(k[2] for k in grid)
        self._open: dict[tuple[int, int], dict[str, Any]] = {}

    def file(self, tp: int, pp: int) -> dict[str, Any]:
        if (tp, pp) not in self._open:
            self._open[(tp, pp)] = load_rank_file(self.grid[(tp, pp, 0)])
        return self._open[(tp, pp)]

    def chunks(self, tp: int, pp: int) -> list[dict[str, Any]]:
        ckpt = self.file(tp, pp)
        if "model" in ckpt:
            return [ckpt["model"]]
        keys = sorted((k for k in ckpt if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
        if not keys:
            raise ConversionError(f"{self.grid[(tp, pp, 0)]}: no 'model' state dict")
        return [ckpt[k] for k in keys]


def _tensor_names(state: dict[str, Any]) -> list[str]:
    return [k for k in state if not k.endswith("._extra_state")]


def detect_layout(files: RankFiles) -> PipelineLayout:
    counts: dict[tuple[int, int], int] = {}
    for pp in range(files.pp):
        for chunk, state in enumerate(files.chunks(0, pp)):
            layers = {int(m[1]) for k in state if (m := LAYER_KEY.match(k))}
            if layers and layers != set(range(len(layers))):
                raise ConversionError(f"{files.grid[(0, pp, 0)]}: chunk {chunk} has non-contiguous layer indices {sorted(layers)}")
            counts[(pp, chunk)] = len(layers)
    return layout_from_counts(counts, files.pp)


def metadata_from_args(a: argparse.Namespace, files: RankFiles, iteration: int | str, word: torch.Tensor,
                       true_vocab_size: int | None) -> argparse.Namespace:
    """Protocol metadata from a checkpoint's `args`; missing optional fields get Megatron defaults."""
    def need(name: str) -> Any:
        if not hasattr(a, name):
            raise ConversionError(f"checkpoint args lack '{name}'")
        return getattr(a, name)

    heads = need("num_attention_heads")
    groups = getattr(a, "num_query_groups", None) if getattr(a, "group_query_attention", False) else heads
    params_dtype = getattr(a, "params_dtype", None) or word.dtype
    return P.make_metadata(
        model_type="GPT",
        num_layers=need("num_layers"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=getattr(a, "ffn_hidden_size", None) or 4 * a.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups or heads,
        kv_channels=getattr(a, "kv_channels", None) or a.hidden_size // heads,
        seq_length=getattr(a, "seq_length", None),
        max_position_embeddings=getattr(a, "max_position_embeddings", None),
        tokenizer_type=getattr(a, "tokenizer_type", None),
        iteration=iteration,
        params_dtype=params_dtype,
        bert_binary_head=False,
        output_layer=bool(getattr(a, "untie_embeddings_and_output_weights", False)),
        position_embedding_type=getattr(a, "position_embedding_type", "learned_absolute"),
        linear_bias=bool(getattr(a, "add_bias_linear", True)),
        qkv_bias=bool(getattr(a, "add_qkv_bias", False)) or bool(getattr(a, "add_bias_linear", True)),
        norm_has_bias=getattr(a, "normalization", "LayerNorm") == "LayerNorm",
        swiglu=bool(getattr(a, "swiglu", False)),
        true_vocab_size=true_vocab_size or getattr(a, "true_vocab_size", None),
        vocab_size=getattr(a, "vocab_size", None),
        make_vocab_size_divisible_by=getattr(a, "make_vocab_size_divisible_by", 128),
        num_experts=getattr(a, "num_experts", None),
        previous_tensor_parallel_size=files.tp,
        previous_pipeline_parallel_size=files.pp,
        consumed_train_samples=getattr(a, "consumed_train_samples", 0),
        consumed_valid_samples=getattr(a, "consumed_valid_samples", 0),
        normalization=getattr(a, "normalization", "LayerNorm"),
        norm_epsilon=getattr(a, "norm_epsilon", 1e-5),
        rotary_base=getattr(a, "rotary_base", 10000),
        qk_layernorm=bool(getattr(a, "qk_layernorm", False)),
        hf_config=getattr(a, "hf_config", None),
    )


class McoreLoader:
    def __init__(self, args: argparse.Namespace) -> None:
        iteration_dir, self.iteration = find_iteration_dir(Path(args.load_dir))
        self.files = RankFiles(rank_grid(iteration_dir))
        f = self.files
        if f.ep > 1:
            raise ConversionError(f"{iteration_dir}: expert-parallel checkpoints (EP={f.ep}) need a MoE loader")
        for flag, value, found in (("--source-tensor-parallel-size", args.source_tensor_parallel_size, f.tp),
                                   ("--source-pipeline-parallel-size", args.source_pipeline_parallel_size, f.pp)):
            if value is not None and value != found:
                raise ConversionError(f"{flag} {value} disagrees with the checkpoint, which has {found}")
        first = f.file(0, 0)
        if "args" not in first:
            raise ConversionError(f"{f.grid[(0, 0, 0)]}: no 'args' in the checkpoint")
        self.impl = detect_impl(_tensor_names(f.chunks(0, 0)[0]))
        if args.loader_transformer_impl and args.loader_transformer_impl != self.impl:
            raise ConversionError(f"--loader-transformer-impl {args.loader_transformer_impl} disagrees with the files ({self.impl} names)")
        self.layout = detect_layout(f)
        word = f.chunks(0, 0)[0].get("embedding.word_embeddings.weight")
        if word is None:
            raise ConversionError(f"{f.grid[(0, 0, 0)]}: no embedding.word_embeddings.weight")
        self.md = metadata_from_args(first["args"], f, self.iteration, word, args.true_vocab_size)
        self.md.learned_absolute = self.md.position_embedding_type == "learned_absolute"
        if self.layout.num_layers != self.md.num_layers:
            raise ConversionError(f"the files hold {self.layout.num_layers} layers but args.num_layers is {self.md.num_layers}")
        self.layer_table = [p for p in layer_params(self.impl) if p.applies(self.md)]
        self._check_names()

    def _planned(self, pp: int, chunk: int, segs: list[Segment]) -> set[str]:
        """Names this loader will read from one chunk of one pipeline rank."""
        md, last = self.md, self.files.pp - 1
        names: set[str] = set()
        seg = segs[chunk]
        for local in range(seg.count):
            names.update(LAYER_PREFIX.format(layer=local) + p.name for p in self.layer_table)
        if pp == 0 and chunk == 0:
            names.update(p.name for p in EMBEDDING_PARAMS if p.applies(md))
        if pp == last and chunk == len(segs) - 1:
            names.update(p.name for p in FINAL_NORM_PARAMS if p.applies(md))
            if md.output_layer or self.files.pp > 1:
                names.add("output_layer.weight")
        return names

    def _check_names(self) -> None:
        """Every tensor in every file is mapped, and every mapped tensor exists."""
        for (tp, pp, _), path in sorted(self.files.grid.items()):
            segs = self.layout.rank_segments(pp)
            for chunk, state in enumerate(self.files.chunks(tp, pp)):
                planned, present = self._planned(pp, chunk, segs), set(_tensor_names(state))
                if present - planned:
                    extra = sorted(present - planned)
                    raise ConversionError(f"{path}: unmapped tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
                if planned - present:
                    raise ConversionError(f"{path}: missing tensors {sorted(planned - present)[:5]}")

    def _gather(self, params: tuple[Param, ...] | list[Param], pp: int, chunk: int, prefix: str = "") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for param in params:
            if not param.applies(self.md):
                continue
            shards = [self.files.chunks(tp, pp)[chunk][prefix + param.name] for tp in range(self.files.tp)]
            full = gather(shards, COLUMN if param.rule == VOCAB else param.rule, prefix + param.name)
            out.update(zip(param.keys, full if isinstance(full, tuple) else (full,)))
        return out

    def send(self, queue: Any) -> None:
        queue.put(self.md)
        pp_last = self.files.pp - 1
        queue.put({"name": P.EMBEDDINGS, **self._gather(EMBEDDING_PARAMS, 0, 0)})
        for layer in progress(range(self.md.num_layers), self.md.num_layers, "loader_core_ext"):
            seg, local = self.layout.locate(layer)
            msg = self._gather(self.layer_table, seg.pp_rank, seg.chunk, LAYER_PREFIX.format(layer=local))
            queue.put({"name": P.layer_message(layer), **msg})
        last_chunk = len(self.layout.rank_segments(pp_last)) - 1
        queue.put({"name": P.FINAL_NORM, **self._gather(FINAL_NORM_PARAMS, pp_last, last_chunk)})
        if self.md.output_layer:
            queue.put({"name": P.OUTPUT_LAYER, **self._gather(OUTPUT_PARAMS, pp_last, last_chunk)})
        queue.put(P.DONE)


def load(queue: Any, args: argparse.Namespace) -> None:
    McoreLoader(args).send(queue)
