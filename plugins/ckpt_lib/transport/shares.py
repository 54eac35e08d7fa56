"""Parallel conversion: N workers (processes on one machine, or torchrun ranks on many) each write
their share of the target rank files into one staged output directory.

A worker owns a contiguous block of the target's rank files in (pipeline, expert, tensor) order, so
that with PP >= N every worker owns whole pipeline stages and its loader reads only those stages'
layers (memory-mapped; pages shared between workers on one machine). Each worker's files are the
bytes a single conversion writes; the driver merges the workers' manifest parts and commits.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..io.manifest import Manifest
from ..io.staging import StagedDir
from ..layout.pipeline import PipelineLayout, make_layout, parse_layer_list
from .runtime import Summary
from .spec import ModelSpec


@dataclass(frozen=True)
class Share:
    """Worker `index` of `count`, writing into the staged output directory `root`."""

    index: int
    count: int
    root: Path

    def owns(self, pp_rank: int, ep_rank: int, tp_rank: int, sizes: tuple[int, int, int]) -> bool:
        """Whether this worker writes the rank file (pp_rank, ep_rank, tp_rank) of a (tp, pp, ep) target."""
        tp, pp, ep = sizes
        flat = (pp_rank * ep + ep_rank) * tp + tp_rank
        return flat * self.count // (tp * pp * ep) == self.index

    def stages(self, sizes: tuple[int, int, int]) -> set[int]:
        tp, pp, ep = sizes
        return {p for p in range(pp) for e in range(ep) for t in range(tp) if self.owns(p, e, t, sizes)}


def target_sizes(args: argparse.Namespace, md: ModelSpec) -> tuple[int, int, int]:
    """(TP, PP, EP) of the output: the saver's `--target-*` options, else the source's."""
    tp = getattr(args, "target_tensor_parallel_size", None) or md.previous_tensor_parallel_size or 1
    pp = getattr(args, "target_pipeline_parallel_size", None) or md.previous_pipeline_parallel_size or 1
    return tp, pp, getattr(args, "target_expert_parallel_size", None) or 1


def target_layout(args: argparse.Namespace, md: ModelSpec) -> PipelineLayout:
    """The output's pipeline layout from the saver's options (noop layers, uneven PP, VPP, dualpipev)."""
    noop = parse_layer_list(getattr(args, "noop_layers", None)) or []
    return make_layout(md.num_layers + len(noop), target_sizes(args, md)[1],
                       parse_layer_list(getattr(args, "num_layer_list", None)),
                       getattr(args, "num_layers_per_virtual_pipeline_stage", None), noop,
                       getattr(args, "schedules_method", None) == "dualpipev")


def layers_to_send(args: argparse.Namespace, md: ModelSpec) -> tuple[int, ...] | None:
    """The protocol layers (MTP layers numbered after the decoder's) a worker's saver needs, or None
    (all) when the conversion is not shared. Embeddings, final norm and output layer are always sent."""
    share: Share | None = getattr(args, "share", None)
    if share is None:
        return None
    layout = target_layout(args, md)
    stages = share.stages(target_sizes(args, md))
    layers = [i for i in range(md.num_layers) if layout.locate_real(i)[0].pp_rank in stages]
    if layout.last_segment().pp_rank in stages:
        layers += [md.num_layers + k for k in range(md.mtp_num_layers)]
    return tuple(layers)


def finish(staged: StagedDir, statuses: list[int], summary: Summary) -> int:
    """Commit the staged output when every worker succeeded (merging their manifest parts), else
    discard it; returns the conversion's exit status."""
    failed = [index for index, status in enumerate(statuses) if status != 0]
    if failed:
        staged.discard()
        print(f"error: convert: worker(s) {', '.join(map(str, failed))} of {len(statuses)} failed; nothing was written",
              file=sys.stderr, flush=True)
        return 1
    Manifest.merge_parts(staged.path, len(statuses)).write(staged.path)
    for path in staged.path.rglob("*"):
        if path.is_file():
            summary.add_file(path.stat().st_size)
    summary.print(staged.commit())
    return 0
