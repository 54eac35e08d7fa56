"""Pipeline layout: which global transformer layer lives in which rank file, chunk and local index.

Pure functions of the parallel configuration, no I/O. A layout is a list of segments, one per
(pipeline rank, virtual chunk), each holding a contiguous range of global layers; Megatron numbers
layers locally inside each segment (restarting at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConversionError


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
    """The pipeline split of `num_layers` layers over `pp` ranks (and `num_chunks` virtual chunks).

    `num_layers` counts the padded numbering, noop layers included (MindSpeed-LLM `--noop-layers`:
    placeholders without weights); protocol layer i is the i-th layer that is not a noop layer.
    """

    num_layers: int
    pp: int
    segments: tuple[Segment, ...]
    noop: frozenset[int] = frozenset()

    @property
    def real_layers(self) -> list[int]:
        """Padded indices of the layers that hold weights, in protocol order."""
        return [i for i in range(self.num_layers) if i not in self.noop]

    def first_segment(self) -> Segment:
        return min(self.segments, key=lambda s: s.start)

    def last_segment(self) -> Segment:
        """Where the final norm, output layer and MTP live (rank 0's second chunk under dualpipev)."""
        return max(self.segments, key=lambda s: s.start)

    def split_ends(self) -> bool:
        """Whether the first and last stages are different model chunks (PP > 1, or rank 0's two
        dualpipev chunks): the last one then keeps its own copy of the word embeddings for a tied
        output layer or for MTP, as megatron-core builds it."""
        first, last = self.first_segment(), self.last_segment()
        return (first.pp_rank, first.chunk) != (last.pp_rank, last.chunk)

    @property
    def num_chunks(self) -> int:
        return 1 + max(s.chunk for s in self.segments)

    def locate_real(self, layer: int) -> tuple[Segment, int]:
        """Like `locate`, for protocol layer numbering (noop layers skipped)."""
        return self.locate(self.real_layers[layer])

    def locate(self, layer: int) -> tuple[Segment, int]:
        """The segment holding padded `layer` and the layer's local index inside it."""
        for seg in self.segments:
            if seg.start <= layer < seg.stop:
                return seg, layer - seg.start
        raise ConversionError(f"layer {layer} is outside the pipeline layout of {self.num_layers} layers")

    def rank_segments(self, pp_rank: int) -> list[Segment]:
        return sorted((s for s in self.segments if s.pp_rank == pp_rank), key=lambda s: s.chunk)

    def last_layer_of_rank(self, pp_rank: int) -> int:
        """The highest real (protocol) layer a rank holds, or -1 for a rank without real layers."""
        real = self.real_layers
        held = [i for i, padded in enumerate(real) if self.locate(padded)[0].pp_rank == pp_rank]
        return max(held, default=-1)

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
    noop_layers: list[int] | None = None,
    dualpipev: bool = False,
) -> PipelineLayout:
    """Build and validate a layout from Megatron / MindSpeed-LLM options.

    `num_layers` is the padded count (noop layers included). `num_layer_list` (uneven stages),
    `layers_per_virtual_stage` (VPP), `noop_layers` and `dualpipev` follow the seeds' exclusions.
    """
    noop = frozenset(noop_layers or ())
    if noop and num_layer_list is not None:
        raise ConversionError("--noop-layers and --num-layer-list cannot be used together")
    if any(i < 0 or i >= num_layers for i in noop):
        raise ConversionError(f"--noop-layers {sorted(noop)} must lie in [0, {num_layers})")
    if dualpipev:
        return _dualpipev(num_layers, pp, num_layer_list, layers_per_virtual_stage, noop)
    layout = _plain_layout(num_layers, pp, num_layer_list, layers_per_virtual_stage)
    return PipelineLayout(layout.num_layers, layout.pp, layout.segments, noop)


def _dualpipev(num_layers: int, pp: int, num_layer_list: list[int] | None, vpp: int | None,
               noop: frozenset[int]) -> PipelineLayout:
    """DualPipeV: rank r holds [r*S, (r+1)*S) and the mirrored [L-(r+1)*S, L-r*S), S = L / (2 PP)."""
    if num_layer_list is not None or vpp is not None:
        raise ConversionError("--schedules-method dualpipev cannot be combined with --num-layer-list or VPP")
    if num_layers % (2 * pp):
        raise ConversionError(f"dualpipev needs the layer count {num_layers} divisible by 2 x pipeline size {pp}")
    size = num_layers // (2 * pp)
    segments = [Segment(r, 0, r * size, size) for r in range(pp)]
    segments += [Segment(r, 1, num_layers - (r + 1) * size, size) for r in range(pp)]
    return PipelineLayout(num_layers, pp, tuple(segments), noop)


def _plain_layout(num_layers: int, pp: int, num_layer_list: list[int] | None,
                  layers_per_virtual_stage: int | None) -> PipelineLayout:
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


def layout_from_counts(counts: dict[tuple[int, int], int], pp: int, noop: frozenset[int] = frozenset()) -> PipelineLayout:
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
    return PipelineLayout(start, pp, tuple(segments), noop)
