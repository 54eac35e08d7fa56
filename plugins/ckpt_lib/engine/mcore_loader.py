"""Megatron-Core legacy `torch` checkpoints of any TP/PP/VPP layout -> protocol messages.

The layout is detected from the files (rank directories, `model`/`model0..` chunks, layer
indices), so checkpoints written by Megatron-LM itself, by MindSpeed-LLM or by our saver all
load. Every tensor is either mapped or reported before the first message is sent.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..families import megatron
from ..families.lora import LORA_A, LORA_B, LoraOptions, check_options, gather_adapter, merge, split_adapters, split_fused_down
from ..families.mcore_names import VOCAB, Param, detect_impl
from ..families.mcore_version import detect_mtp_submodule
from ..families.mindspeed import is_mindspeed
from ..families.naming_profile import NamingProfile
from ..io.megatron_io import FileMaps, find_iteration_dir, load_rank_file, rank_grid
from ..io.safetensors_io import empty_shared
from ..io.torch_dist import is_torch_dist
from ..layout.pipeline import PipelineLayout, Segment, layout_from_counts, make_layout, parse_layer_list
from ..layout.sharding import COLUMN, GATED, gather
from ..transport import protocol as P
from ..transport.runtime import progress
from ..transport.shares import layers_to_send
from ..transport.spec import LoraExport
from . import optimizer_state
from .mcore_plan import Placement, RankFilePlan

LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")



def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--source-tensor-parallel-size", type=int, default=None, help="Checked against the files")
    group.add_argument("--source-pipeline-parallel-size", type=int, default=None, help="Checked against the files")
    group.add_argument("--source-expert-parallel-size", type=int, default=None, help="Checked against the files")
    group.add_argument("--loader-transformer-impl", choices=["local", "transformer_engine"], default=None,
                       help="Checked against the files (detected from the norm names)")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Real vocabulary size (default: recorded in the checkpoint's args, else keep padding)")
    group.add_argument("--lora-load", type=str, default=None,
                       help="A LoRA-only checkpoint (saved with --lora-ckpt-filter) to merge into --load-dir")
    group.add_argument("--lora-r", type=int, default=None, help="LoRA rank used in fine-tuning (checked against the shapes)")
    group.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha used in fine-tuning (scale alpha / r)")
    group.add_argument("--lora-target-modules", nargs="+", default=None,
                       help="LoRA target modules, e.g. linear_qkv linear_proj linear_fc1 linear_fc2 (checked)")
    group.add_argument("--lora-use-rslora", action="store_true", help="rsLoRA scaling alpha / sqrt(r)")
    group.add_argument("--strict", action="store_true", help="NaN/Inf in a weight is an error instead of a warning")
    group.add_argument("--save-lora-to-hf", action="store_true",
                       help="Export the LoRA adapters alone as a PEFT adapter directory (with saver hf)")
    optimizer_state.add_loader_arguments(group)


class RankFiles:
    """Lazily memory-mapped rank files of one iteration."""

    def __init__(self, grid: dict[tuple[int, int, int], Path]) -> None:
        self.grid = grid
        self.tp = 1 + max(k[0] for k in grid)
        self.pp = 1 + max(k[1] for k in grid)
        self.ep = 1 + max(k[2] for k in grid)
        self._open: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.maps = FileMaps()

    def file(self, tp: int, pp: int, ep: int = 0) -> dict[str, Any]:
        if (tp, pp, ep) not in self._open:
            self._open[(tp, pp, ep)] = load_rank_file(self.grid[(tp, pp, ep)])
            self.maps.add(self.grid[(tp, pp, ep)])
        return self._open[(tp, pp, ep)]

    def chunks(self, tp: int, pp: int, ep: int = 0) -> list[dict[str, Any]]:
        ckpt = self.file(tp, pp, ep)
        if "model" in ckpt:
            return [ckpt["model"]]
        keys = sorted((k for k in ckpt if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
        if not keys:
            raise ConversionError(f"{self.grid[(tp, pp, ep)]}: no 'model' state dict")
        return [ckpt[k] for k in keys]


class TorchDistFiles(RankFiles):
    """A torch_dist checkpoint presented as one TP1/PP1/EP1 rank file (read whole by megatron-core)."""

    def __init__(self, iteration_dir: Path) -> None:
        from ..io import torch_dist

        ns, state = torch_dist.load(iteration_dir)
        super().__init__({(0, 0, 0): iteration_dir})
        iteration = getattr(ns, "iteration", None)
        self._open[(0, 0, 0)] = {"args": torch_dist.single_rank_args(ns), "model": state, "iteration": iteration}


def _tensor_names(state: dict[str, Any]) -> list[str]:
    return [k for k in state if not k.endswith("._extra_state")]


def detect_layout(files: RankFiles, a: argparse.Namespace) -> PipelineLayout:
    """Counted from the files; noop layers and dualpipev, which counting cannot see, from `args`."""
    noop, dualpipev = parse_layer_list(getattr(a, "noop_layers", None)), getattr(a, "schedules_method", None) == "dualpipev"
    if noop or dualpipev:
        vpp = getattr(a, "num_layers_per_virtual_pipeline_stage", None)
        return make_layout(a.num_layers, files.pp, parse_layer_list(getattr(a, "num_layer_list", None)), vpp, noop, dualpipev)
    counts: dict[tuple[int, int], int] = {}
    for pp in range(files.pp):
        for chunk, state in enumerate(files.chunks(0, pp)):
            layers = {int(m[1]) for k in state if (m := LAYER_KEY.match(k))}
            if layers and layers != set(range(len(layers))):
                raise ConversionError(f"{files.grid[(0, pp, 0)]}: chunk {chunk} has non-contiguous layer indices {sorted(layers)}")
            counts[(pp, chunk)] = len(layers)
    return layout_from_counts(counts, files.pp)


class McoreLoader:
    def __init__(self, args: argparse.Namespace) -> None:
        iteration_dir, self.iteration = find_iteration_dir(Path(args.load_dir))
        self.files = f = TorchDistFiles(iteration_dir) if is_torch_dist(iteration_dir) else RankFiles(rank_grid(iteration_dir))
        self.experts_per_message = getattr(args, "experts_per_message", 8) or 8
        for flag, value, found in (("--source-tensor-parallel-size", args.source_tensor_parallel_size, f.tp),
                                   ("--source-pipeline-parallel-size", args.source_pipeline_parallel_size, f.pp),
                                   ("--source-expert-parallel-size", getattr(args, "source_expert_parallel_size", None), f.ep)):
            if value is not None and value != found:
                raise ConversionError(f"{flag} {value} disagrees with the checkpoint, which has {found}")
        first = f.file(0, 0)
        if "args" not in first:
            raise ConversionError(f"{f.grid[(0, 0, 0)]}: no 'args' in the checkpoint")
        raw_names = _tensor_names(f.chunks(0, 0)[0])
        self.impl = detect_impl(raw_names)
        cargs = first["args"]
        self.mindspeed = is_mindspeed(raw_names) or getattr(cargs, "naming", None) == "mindspeed"
        self.tp_extend = bool(getattr(cargs, "moe_tp_extend_ep", False))
        self.te_grouped = self.impl == "transformer_engine" and any(".mlp.experts.linear_fc1.weight" in n for n in raw_names)
        self._chunks: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
        self._adapters: dict[tuple[int, int, int], list[dict[str, dict[str, torch.Tensor]]]] = {}
        self.lora = LoraOptions(args.lora_r, args.lora_alpha, args.lora_target_modules, args.lora_use_rslora)
        self.lora_files = self._lora_files(args.lora_load, f)
        self.export = bool(getattr(args, "save_lora_to_hf", False))
        self.strict = bool(getattr(args, "strict", False))
        self.args = args
        if args.loader_transformer_impl and args.loader_transformer_impl != self.impl:
            raise ConversionError(f"--loader-transformer-impl {args.loader_transformer_impl} disagrees with the files ({self.impl} names)")
        self.layout = detect_layout(f, first["args"])
        word = f.chunks(0, 0)[0].get("embedding.word_embeddings.weight")
        if word is None and not self.export:
            raise ConversionError(f"{f.grid[(0, 0, 0)]}: no embedding.word_embeddings.weight")
        md = megatron.metadata_from_args(first["args"], (f.tp, f.pp), self.iteration, word, args.true_vocab_size)
        # protocol numbering: noop layers skipped
        self.md = md = dataclasses.replace(md, num_layers=len(self.layout.real_layers))
        if self.layout.num_layers != first["args"].num_layers:
            raise ConversionError(f"the files hold {self.layout.num_layers} layers but args.num_layers is {first['args'].num_layers}")
        last = self.layout.last_segment()
        last_names = _tensor_names(f.chunks(0, last.pp_rank, 0)[last.chunk]) if md.mtp_num_layers else []
        self.plan = RankFilePlan(md, self.layout, f.tp, f.ep, self.impl, whole_mla_down=self.mindspeed, grouped=self.te_grouped,
                                 tp_extend=self.tp_extend, mtp_submodule=detect_mtp_submodule(last_names))
        self._check_names()

    @staticmethod
    def _lora_files(lora_load: str | None, base: RankFiles) -> RankFiles | None:
        if lora_load is None:
            return None
        files = RankFiles(rank_grid(find_iteration_dir(Path(lora_load))[0]))
        if (files.tp, files.pp, files.ep) != (base.tp, base.pp, base.ep):
            raise ConversionError(f"--lora-load {lora_load}: layout TP{files.tp} PP{files.pp} EP{files.ep} differs from "
                                  f"--load-dir's TP{base.tp} PP{base.pp} EP{base.ep}")
        return files

    def chunks(self, tp: int, pp: int, ep: int) -> list[dict[str, Any]]:
        """A rank file's chunks under megatron-core local/TE names (MindSpeed-LLM names rewritten,
        LoRA `base_layer` names restored; adapters kept aside for merging)."""
        key = (tp, pp, ep)
        if key not in self._chunks:
            split = [split_adapters(c) for c in self.files.chunks(tp, pp, ep)]
            split = [(NamingProfile.read(base, self.md, self.plan.experts_per_rank), split_fused_down(adapters, self.md))
                     for base, adapters in split]
            self._chunks[key] = [base for base, _ in split]
            self._adapters[key] = [adapters for _, adapters in split]
            if self.lora_files is not None:
                for chunk, state in enumerate(self.lora_files.chunks(tp, pp, ep)):
                    base, adapters = split_adapters(state)
                    if _tensor_names(base):
                        raise ConversionError(f"{self.lora_files.grid[key]}: --lora-load holds non-LoRA tensors "
                                              f"({_tensor_names(base)[0]}); save it with --lora-ckpt-filter")
                    self._adapters[key][chunk].update(adapters)
        return self._chunks[key]

    def adapters(self, tp: int, pp: int, ep: int, chunk: int) -> dict[str, dict[str, torch.Tensor]]:
        self.chunks(tp, pp, ep)
        return self._adapters[(tp, pp, ep)][chunk]

    def _check_names(self) -> None:
        """Every tensor in every file is mapped, and every mapped tensor exists."""
        self.found_adapters = 0
        for (tp, pp, ep), path in sorted(self.files.grid.items()):
            for chunk, state in enumerate(self.chunks(tp, pp, ep)):
                planned, present = self.plan.names(pp, chunk), set(_tensor_names(state))
                if present - planned:
                    extra = sorted(present - planned)
                    raise ConversionError(f"{path}: unmapped tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
                if planned - present and not (self.export and not present):
                    raise ConversionError(f"{path}: missing tensors {sorted(planned - present)[:5]}")
                adapters = self.adapters(tp, pp, ep, chunk)
                if self.export and any(".experts." in m for m in adapters):
                    raise ConversionError(f"{path}: exporting routed-expert LoRA adapters to PEFT is not supported")
                stray = sorted(m for m in adapters if m + ".weight" not in planned)
                if stray:
                    raise ConversionError(f"{path}: LoRA adapters on unsupported modules {stray[:3]}")
                check_options(adapters, self.lora, str(path))
                self.found_adapters += len(adapters)
        if self.export and not self.found_adapters:
            raise ConversionError("--save-lora-to-hf: the checkpoint holds no LoRA adapters")
        if self.found_adapters and self.lora.alpha is None:
            raise ConversionError(f"the checkpoint holds {self.found_adapters} LoRA adapters: pass --lora-r and --lora-alpha to merge them")
        if not self.found_adapters and (self.lora.alpha is not None or self.lora_files is not None):
            raise ConversionError("LoRA options given, but the checkpoint holds no LoRA adapters")

    def _gather(self, params: Iterable[Param], seg: Segment, prefix: str = "", ep: int = 0, only_tp: int | None = None,
                into: Callable[[str, list[int], torch.dtype], torch.Tensor] | None = None, **fmt: int) -> dict[str, torch.Tensor]:
        """Full tensors from the TP shards (or from one TP rank's whole copy, `only_tp`), LoRA merged, joined once
        into the tensor `into(key, shape, dtype)` gives for their protocol key (default: new shared memory for the queue)."""
        out: dict[str, torch.Tensor] = {}
        for param in params:
            name = prefix + param.name.format(**fmt)
            tps = range(self.files.tp) if only_tp is None else [only_tp]
            shards = [self.chunks(tp, seg.pp_rank, ep)[seg.chunk][name] for tp in tps]
            rule = COLUMN if param.rule == VOCAB else param.rule
            keys = iter(param.keys)  # gather fills a gated pair's halves in key order
            full = gather(shards, rule, name, empty_shared if into is None else
                          lambda shape, dtype, keys=keys: into(next(keys), shape, dtype), self.files.maps.copy)
            module = name.removesuffix(".weight")
            if only_tp is None and module in self.adapters(0, seg.pp_rank, ep, seg.chunk):
                merged = self._merge(full, [self.adapters(tp, seg.pp_rank, ep, seg.chunk)[module] for tp in tps], rule, module)
                full = tuple(t.copy_(m) for t, m in zip(full, merged)) if isinstance(full, tuple) else full.copy_(merged)
            out.update(zip(param.keys, full if isinstance(full, tuple) else (full,)))
        return out

    def _send(self, queue: Any, placement: Placement) -> None:
        """One message, gathered from its plan groups, then its routed experts in stacked messages."""
        seg, msg = placement.segment, {}
        for group in placement.groups:
            msg.update(self._gather(group.params, seg, group.prefix))
        queue.put({"name": placement.message, **msg})
        self._copied()
        if placement.experts is None:
            return
        num_experts = self.md.moe.num_experts if self.md.moe else 0
        for first in range(0, num_experts, self.experts_per_message):
            experts = range(first, min(first + self.experts_per_message, num_experts))
            stacked = self._gather_experts(experts, seg, placement.experts)
            queue.put({"name": P.experts_message(placement.message), P.FIRST_EXPERT: first, **stacked})
            self._copied()

    def _copied(self) -> None:
        """The rank-file tensors read through the map for the message just sent were copied into it: their pages
        leave this process's memory (a memory-mapped page read counts in it until unmapped: a whole stage by its end)."""
        self.files.maps.drop_read()

    def _merge(self, full: Any, adapter_shards: list[dict[str, torch.Tensor]], rule: str, module: str) -> Any:
        a, b = gather_adapter(adapter_shards, rule, module)
        scale = self.lora.scale(a.shape[0])
        if rule == GATED:
            return tuple(merge(w, a, half, scale) for w, half in zip(full, b))
        return merge(full, a, b, scale)

    def _gather_experts(self, experts: range, seg: Segment, prefix: str) -> dict[str, torch.Tensor]:
        """The experts' stacked keys [count, ...] in shared memory, each expert gathered straight into its row."""
        stacked: dict[str, torch.Tensor] = {}

        for row, expert in enumerate(experts):
            def into(key: str, shape: list[int], dtype: torch.dtype, row: int = row) -> torch.Tensor:
                if key not in stacked:
                    stacked[key] = empty_shared((len(experts), *shape), dtype)
                return stacked[key][row]

            slot = self.plan.expert_slot(expert)
            self._gather(self.plan.expert_params, seg, prefix, slot.ep_rank, slot.tp_rank, into, expert=slot.local)
        return stacked

    def _gather_adapters(self, params: Iterable[Param], seg: Segment, prefix: str) -> dict[str, torch.Tensor]:
        """Protocol keys '<key> lora A' / '<key> lora B' of the adapted parameters (TP-gathered)."""
        out: dict[str, torch.Tensor] = {}
        for param in params:
            module = (prefix + param.name).removesuffix(".weight")
            if module not in self.adapters(0, seg.pp_rank, 0, seg.chunk):
                continue
            shards = [self.adapters(tp, seg.pp_rank, 0, seg.chunk)[module] for tp in range(self.files.tp)]
            a, b = gather_adapter(shards, param.rule, module)
            for key, part in zip(param.keys, b if isinstance(b, tuple) else (b,)):
                out[f"{key} {LORA_A}"], out[f"{key} {LORA_B}"] = a, part
        return out

    def send_adapters(self, queue: Any) -> None:
        """--save-lora-to-hf: metadata with the LoRA settings, then each layer's adapters."""
        md = self.md = dataclasses.replace(self.md, lora_export=LoraExport(self.lora.rank, self.lora.alpha, self.lora.rslora))
        P.send_spec(queue, md, self.args)
        for placement in self.plan.placements():
            if placement.layer is not None and placement.layer < md.num_layers:
                msg: dict[str, torch.Tensor] = {}
                for group in placement.groups:
                    msg.update(self._gather_adapters(group.params, placement.segment, group.prefix))
                queue.put({"name": placement.message, **msg})
        queue.put(P.DONE)

    def send(self, queue: Any) -> None:
        queue = FiniteCheckingQueue(queue, self.strict)
        if self.export:
            return self.send_adapters(queue)
        # a worker sends only the layers it writes
        md = self.md = dataclasses.replace(self.md, share_layers=layers_to_send(self.args, self.md))
        optim = optimizer_state.loader_message(self)  # read and checked before anything is sent
        P.send_spec(queue, md, self.args)
        placements = list(self.plan.placements(md.share_layers))
        for placement in progress(placements, len(placements), "loader_core_ext"):
            self._send(queue, placement)
        if optim is not None:
            queue.put(optim)
        queue.put(P.DONE)


class FiniteCheckingQueue:
    """Checks every outgoing message for NaN/Inf before it reaches the saver."""

    def __init__(self, queue: Any, strict: bool) -> None:
        self.queue, self.strict = queue, strict

    def put(self, msg: Any) -> None:
        if isinstance(msg, dict):
            P.check_finite(msg, self.strict)
        self.queue.put(msg)


def load(queue: Any, args: argparse.Namespace) -> None:
    McoreLoader(args).send(queue)
