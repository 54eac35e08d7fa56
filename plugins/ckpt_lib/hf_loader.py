"""HuggingFace dense checkpoints (config.json + safetensors) -> protocol messages, layer by layer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from . import protocol as P
from .errors import ConversionError
from .families import Section, dense, to_protocol
from .safetensors_io import SafetensorsSource


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--model-type-hf", type=str, default=None, choices=sorted(dense.VARIANTS),
                       help="HF family (default: config.json model_type)")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Real vocabulary size (default: config.json vocab_size)")


def read_config(load_dir: Path) -> dict[str, Any]:
    path = load_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"--load-dir {load_dir}: missing config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def _sections(md: argparse.Namespace) -> list[tuple[Section, int | None]]:
    """Every (section, layer) the model sends, in protocol order."""
    out: list[tuple[Section, int | None]] = [(dense.EMBEDDING, None)]
    out += [(dense.LAYER, i) for i in range(md.num_layers)]
    out += [(dense.FINAL_NORM, None)]
    if dense.OUTPUT.applies(md):
        out.append((dense.OUTPUT, None))
    return out


def validate(source: SafetensorsSource, md: argparse.Namespace, sections: list[tuple[Section, int | None]]) -> None:
    """Run the whole table on meta tensors (headers only): missing, misshapen and leftover tensors
    are reported before the first message is sent."""
    def meta(name: str) -> torch.Tensor:
        if name not in source:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
        return torch.empty(source.shape(name), dtype=source.dtype(name), device="meta")

    read: set[str] = set()

    def tracked(name: str) -> torch.Tensor:
        read.add(name)
        return meta(name)

    for section, layer in sections:
        msg = to_protocol(section, tracked, md, layer)
        if section.message is None:
            P.check_shapes(msg, P.layer_shapes(md), f"layer {layer}")
        else:
            P.check_shapes(msg, P.global_shapes(md, md.vocab_size)[section.message], section.message)
    leftover = sorted(set(source.names()) - read)
    if not md.output_layer and "lm_head.weight" in leftover:
        leftover.remove("lm_head.weight")  # a tied copy some exporters keep; checked equal when sent
    if leftover:
        more = f" (and {len(leftover) - 5} more)" if len(leftover) > 5 else ""
        raise ConversionError(f"unmapped tensors in the checkpoint: {', '.join(leftover[:5])}{more}")


def load(queue: Any, args: argparse.Namespace) -> None:
    load_dir = Path(args.load_dir)
    cfg = read_config(load_dir)
    source = SafetensorsSource.from_dir(load_dir)
    embed_name = "model.embed_tokens.weight"
    if embed_name not in source:
        raise ConversionError(f"tensor {embed_name!r} is missing from the checkpoint")
    md = dense.metadata_from_hf(cfg, source.dtype(embed_name), args.model_type_hf)
    if args.true_vocab_size:
        md.true_vocab_size = args.true_vocab_size
    sections = _sections(md)
    validate(source, md, sections)
    if not md.output_layer and "lm_head.weight" in source:
        if not torch.equal(source.get("lm_head.weight"), source.get(embed_name)):
            raise ConversionError("config.json says tie_word_embeddings, but lm_head.weight differs from the embeddings")
    queue.put(md)
    from .runtime import progress

    for section, layer in progress(sections, len(sections), "loader_hf"):
        msg: dict[str, Any] = to_protocol(section, source.get, md, layer)
        msg["name"] = section.message or P.layer_message(layer)
        queue.put(msg)
    queue.put(P.DONE)
