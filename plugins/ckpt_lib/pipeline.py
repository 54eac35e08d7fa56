"""Pipeline layout: which global transformer layer lives in which rank file, chunk and local index.

Pure functions of the parallel configuration, no I/O. A layout is a list of segments, one per
(pipeline rank, virtual chunk), each holding a contiguous range of global layers; Megatron numbers
layers locally inside each segment (restarting at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError


@dataclass(frozen=True)
class Segment:
    """A contiguous run of global layers stored as chunk `chunk` of pipeline rank `pp_rank`."""

    pp_rank: int
    chunk: int
    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class PipelineLayout:
    """The pipeline split of `num_layers` layers over `pp` ranks (and `num_chunks` virtual chunks)."""

    num_layers: int
    pp: int
    segments: tuple[Segment, ...]

    @property
    def num_chunks(self) -> int:
        return 1 + max(s.chunk for s in self.segments)

    def locate(self, layer: int) -> tuple[Segment, int]:
        """The segment holding global `layer` and the layer's local index inside it."""
        for seg in self.segments:
            if seg.start <= layer < seg.stop:
                return seg, layer - seg.start
        raise ConversionError(f"layer {layer} is outside the pipeline layout of {self.num_layers} layers")

    def rank_segments(self, pp_rank: int) -> list[Segment]:
        return sorted((s for s in self.segments if s.pp_rank == pp_rank), key=lambda s: s.chunk)

    def last_layer_of_rank(self, pp_rank: int) -> int:
        """The highest global layer a rank holds, or -1 for a rank without layers."""
        return max((s.stop - 1 for s in self.segments if s.pp_rank == pp_rank and s.count), default=-1)

    def layers_per_stage(self) -> list[int]:
        return [sum(s.count for s in self.rank_segments(p)) for p in range(self.pp)]


def parse_layer_list(text: str | None) -> list[int] | None:
    """Parse `--num-layer-list 4,3,3` (also accepts a list already parsed)."""
    if text is None or text == "":
        return None
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConversionError(f"--num-layer-list must be comma-separated integers, got {text!r}") from None


def make_layout(
    num_layers: int,
    pp: int,
    num_layer_list: list[int] | None = None,
    layers_per_virtual_stage: int | None = None,
) -> PipelineLayout:
    """Build and validate a layout from Megatron / MindSpeed-LLM options.

    `num_layer_list` (MindSpeed-LLM's uneven stages) and `layers_per_virtual_stage`
    (`--num-layers-per-virtual-pipeline-stage`) are mutually exclusive, as in the seeds.
    """
    if pp < 1:
        raise ConversionError(f"--target-pipeline-parallel-size must be >= 1, got {pp}")
    if num_layer_list is not None and layers_per_virtual_stage is not None:
        raise ConversionError(
            "--num-layer-list and --num-layers-per-virtual-pipeline-stage cannot be used together"
        )
    if num_layer_list is not None:
        if len(num_layer_list) != pp:
            raise ConversionError(
                f"--num-layer-list has {len(num_layer_list)} entries but the pipeline size is {pp}"
            )
        if sum(num_layer_list) != num_layers:
            raise ConversionError(
                f"--num-layer-list {','.join(map(str, num_layer_list))} sums to {sum(num_layer_list)}, "
                f"but the model has {num_layers} layers"
            )
        if min(num_layer_list) < 1:
            raise ConversionError("--num-layer-list entries must be >= 1")
        segments, start = [], 0
        for rank, count in enumerate(num_layer_list):
            segments.append(Segment(rank, 0, start, count))
            start += count
        return PipelineLayout(num_layers, pp, tuple(segments))
    if layers_per_virtual_stage is not None:
        size = layers_per_virtual_stage
        if pp < 2:
            raise ConversionError("--num-layers-per-virtual-pipeline-stage needs a pipeline size of at least 2")
        if size < 1 or num_layers % pp or (num_layers // pp) % size:
            raise ConversionError(
                f"--num-layers-per-virtual-pipeline-stage {size} does not divide the "
                f"{num_layers // pp if num_layers % pp == 0 else num_layers / pp} layers per pipeline stage"
            )
        chunks = num_layers // pp // size
        segments = [
            Segment(rank, v, (v * pp + rank) * size, size) for v in range(chunks) for rank in range(pp)
        ]
        return PipelineLayout(num_layers, pp, tuple(segments))
    if num_layers % pp:
        raise ConversionError(
            f"{num_layers} layers do not split evenly over pipeline size {pp}; use --num-layer-list"
        )
    per = num_layers // pp
    return PipelineLayout(num_layers, pp, tuple(Segment(r, 0, r * per, per) for r in range(pp)))


def layout_from_counts(counts: dict[tuple[int, int], int], pp: int) -> PipelineLayout:
    """Rebuild a layout from the layer counts found in existing files, keyed by (pp_rank, chunk).

    Global order is chunk-major then rank (Megatron's interleaved schedule), which also covers
    plain and uneven pipelines (one chunk per rank).
    """
    segments, start = [], 0
    num_chunks = 1 + max(c for _, c in counts)
    for chunk in range(num_chunks):
        for rank in range(pp):
            count = counts.get((rank, chunk), 0)
            segments.append(Segment(rank, chunk, start, count))
            start += count
    return PipelineLayout(start, pp, tuple(segments))
