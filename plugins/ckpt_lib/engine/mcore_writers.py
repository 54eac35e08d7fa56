"""Where the Megatron saver's chunks go: legacy `torch` rank files or one torch_dist checkpoint.

Both formats answer the same questions before anything is written (`check` the options, the
`stored` layout and sizes, the spec `impl`, the megatron-core release whose names are written) and
take the same calls afterwards, so the saver is one receive loop whatever the format: `write` one
chunk of one rank (already named by the plan), `close_stage` when a pipeline rank has received its
last layer, `close` at the end, `abandon` on failure. `args` is asked for lazily (a callable): the
padded vocabulary it records is known only once the embeddings have arrived.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..families import mcore_version
from ..families.naming_profile import MINDSPEED, NamingProfile
from ..io.manifest import Manifest, describe
from ..io.megatron_io import RankFileWriter, raise_open_file_limit, rank_dir_name
from ..layout.pipeline import PipelineLayout, make_layout, parse_layer_list
from ..layout.sharding import materialize
from ..transport.runtime import Summary
from ..transport.spec import ModelSpec

Args = Callable[[], argparse.Namespace]
Rank = tuple[int, int, int]  # (pp, ep, tp)


class RankFiles:
    """Legacy rank files `mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt`, one writer per rank, opened at
    its first chunk and closed with its stage; chunks pass through the naming profile on the way."""

    name = "torch"
    carries_optimizer = True

    @staticmethod
    def check(args: argparse.Namespace, workers: bool) -> None:
        """Every option applies to rank files."""

    @staticmethod
    def stored(layout: PipelineLayout, sizes: tuple[int, int, int], md: ModelSpec) -> tuple[PipelineLayout, tuple[int, int, int]]:
        return layout, sizes

    @staticmethod
    def impl(requested: str) -> str:
        return requested

    @staticmethod
    def mcore_target(args: argparse.Namespace) -> mcore_version.Target:
        return mcore_version.resolve(getattr(args, "target_mcore_version", None), getattr(args, "megatron_path", None))

    @staticmethod
    def describe(sizes: tuple[int, int, int], layout: PipelineLayout, naming: str) -> str:
        tp, pp, ep = sizes
        return f"{naming} TP{tp} PP{pp} EP{ep} chunks/rank {layout.num_chunks} layers/stage {layout.layers_per_stage()}"

    def __init__(self, root: Path, sizes: tuple[int, int, int], args: Args, iteration: int | str, md: ModelSpec,
                 profile: NamingProfile, owns: Callable[[Rank], bool], manifest: Manifest, summary: Summary) -> None:
        self.root, (self.tp, self.pp, self.ep) = root, sizes
        self.args, self.iteration, self.md, self.profile = args, iteration, md, profile
        self.owns, self.manifest, self.summary = owns, manifest, summary
        self.open: dict[Rank, RankFileWriter] = {}
        raise_open_file_limit(self.tp * self.pp * self.ep)

    def write(self, rank: Rank, chunk: int, num_chunks: int, tensors: dict[str, Any]) -> None:
        if not self.owns(rank):  # another worker writes this rank
            return
        if rank not in self.open:
            pp, ep, tp = rank
            path = self.root / rank_dir_name(tp, pp, ep, self.pp, self.ep) / "model_optim_rng.pt"
            self.open[rank] = RankFileWriter(path, num_chunks, self.manifest.algorithm)
        writer = self.open[rank]
        for name, tensor in self.profile.write(tensors, self.md).items():
            writer.add(chunk, name, tensor)
        writer.park()

    def close_stage(self, pp_rank: int) -> None:
        for rank in sorted(r for r in self.open if r[0] == pp_rank):
            writer = self.open.pop(rank)
            self.summary.add_file(writer.close(self.args(), self.iteration))
            self.manifest.record(str(writer.path.relative_to(self.root.parent)), writer.described())
            self.manifest.checksum_from(writer.path, writer.finished)

    def close(self) -> None:
        for pp_rank in sorted({r[0] for r in self.open}):
            self.close_stage(pp_rank)

    def abandon(self) -> None:
        """A file caught between two records would otherwise keep a shared write buffer for the life of
        the process (an in-process conversion runs on after a failed one) and its descriptor open."""
        for writer in self.open.values():
            writer.abandon()


class TorchDist:
    """One torch_dist checkpoint (`torch_dist.TorchDistWriter`): whole tensors, TP/PP/EP 1, tensor by
    tensor; megatron-core reshards on load to the target sizes recorded in args."""

    name = "torch_dist"
    carries_optimizer = False

    @staticmethod
    def check(args: argparse.Namespace, workers: bool) -> None:
        """torch_dist is megatron-core's format, written by one process: its names, no MindSpeed-only layouts."""
        if workers:
            raise ConversionError("--ckpt-format torch_dist is written by one process; drop --workers / torchrun")
        for flag, used in (("--naming mindspeed", getattr(args, "naming", None) == MINDSPEED),
                           ("--noop-layers", bool(parse_layer_list(getattr(args, "noop_layers", None)))),
                           ("--schedules-method dualpipev", getattr(args, "schedules_method", None) == "dualpipev"),
                           ("--moe-grouped-gemm", bool(getattr(args, "moe_grouped_gemm", False))),
                           ("--qlora-nf4", bool(getattr(args, "qlora_nf4", False)))):
            if used:
                raise ConversionError(f"--ckpt-format torch_dist cannot be combined with {flag} (use --ckpt-format torch)")

    @staticmethod
    def stored(layout: PipelineLayout, sizes: tuple[int, int, int], md: ModelSpec) -> tuple[PipelineLayout, tuple[int, int, int]]:
        return make_layout(md.num_layers, 1, None, None, [], False), (1, 1, 1)

    @staticmethod
    def impl(requested: str) -> str:
        """megatron-core builds the sharded state dict; its keys are the same for either spec."""
        return "local"

    @staticmethod
    def mcore_target(args: argparse.Namespace) -> mcore_version.Target:
        """torch_dist keys are the same in every release, but are looked up by the names of the
        megatron-core that writes them (imported here)."""
        from megatron.core import package_info

        return mcore_version.Target(mcore_version.parse(package_info.__version__), "megatron-core writing torch_dist")

    @staticmethod
    def describe(sizes: tuple[int, int, int], layout: PipelineLayout, naming: str) -> str:
        tp, pp, ep = sizes
        return f"torch_dist (layout free; args say TP{tp} PP{pp} EP{ep})"

    def __init__(self, root: Path, sizes: tuple[int, int, int], args: Args, iteration: int | str, md: ModelSpec,
                 profile: NamingProfile, owns: Callable[[Rank], bool], manifest: Manifest, summary: Summary) -> None:
        self.root, self.args, self.iteration, self.manifest, self.summary = root, args, iteration, manifest, summary
        self.writer: Any = None

    def write(self, rank: Rank, chunk: int, num_chunks: int, tensors: dict[str, Any]) -> None:
        if self.writer is None:
            from ..io.torch_dist import TorchDistWriter

            self.writer = TorchDistWriter(self.args(), self.iteration, self.root)
        self.manifest.tensors.setdefault(self.root.name, {}).update(describe(tensors))
        for name, tensor in tensors.items():
            self.writer.add(name, materialize(tensor).contiguous())

    def close_stage(self, pp_rank: int) -> None:
        """Tensors are written as they arrive; the checkpoint is completed by `close`."""

    def close(self) -> None:
        self.writer.close()
        for f in self.root.rglob("*"):
            if f.is_file():
                self.summary.add_file(f.stat().st_size)

    def abandon(self) -> None:
        """Nothing is held open between tensors."""


FORMATS: dict[str, type[RankFiles] | type[TorchDist]] = {RankFiles.name: RankFiles, TorchDist.name: TorchDist}
