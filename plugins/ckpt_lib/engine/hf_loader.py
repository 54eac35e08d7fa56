"""HuggingFace checkpoints (config.json + safetensors) -> protocol messages, layer by layer.

A conversion is a plan: the ordered list of messages with the table section that produces each.
The plan first runs on meta tensors built from the safetensors headers, so every missing,
misshapen or unmapped tensor is reported before the first message is sent; then it streams.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..families import Section, deepseek, dense, experts_to_protocol, glm4_moe, qwen3_moe, to_protocol
from ..families.hf_moe import FAMILIES as SOFTMAX_MOE
from ..io.safetensors_io import SafetensorsSource, empty_shared
from ..transport import protocol as P
from ..transport.runtime import progress
from ..transport.shares import layers_to_send
from ..transport.spec import ModelSpec

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Step:
    """One protocol message: which section builds it, for which layer, and its expected shapes."""

    message: str
    section: Section
    layer: int | None
    shapes: dict[str, tuple[int, ...]]
    experts: tuple[int, int] | None = None  # (first, count) for a routed-experts message
    cast: torch.dtype | None = None  # round floating tensors once to this dtype (loader --params-dtype)

    def build(self, read: Callable[[str], Any], md: ModelSpec) -> dict[str, Any]:
        if self.experts is None:
            msg = to_protocol(self.section, read, md, self.layer)
        else:
            first, count = self.experts
            msg = {P.FIRST_EXPERT: first, **experts_to_protocol(self.section, read, md, self.layer, first, count)}
        if self.cast is not None:
            msg = {k: cast_shared(v, self.cast) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in msg.items()}
        return msg


def cast_shared(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as `dtype`, converted straight into shared memory: the queue then passes it by handle (`t.to(dtype)`
    made private memory, which the queue copied again into shared memory)."""
    return t if t.dtype == dtype else empty_shared(t.shape, dtype).copy_(t)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--model-type-hf", type=str, default=None,
                       choices=sorted([*dense.VARIANTS, *SOFTMAX_MOE, glm4_moe.MODEL_TYPE, *deepseek.V3_MODEL_TYPES,
                                       *deepseek.V2_MODEL_TYPES]),
                       help="HF family (default: config.json model_type; MLA families are read by loader_hf_deepseek3)")
    group.add_argument("--experts-per-message", type=int, default=8, help="MoE: routed experts per protocol message")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Real vocabulary size (default: config.json vocab_size)")
    group.add_argument("--mtp-num-layers", type=int, default=None,
                       help="GLM-4.5: MTP layers to convert (default: those of config.json num_nextn_predict_layers the "
                            "checkpoint holds; 0 skips them)")
    add_latent_norm_eps(group)
    add_strict(group)


def add_latent_norm_eps(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--accept-latent-norm-eps", action="store_true",
                       help="MLA configs with rms_norm_eps other than 1e-6 (Moonlight: 1e-5): convert anyway; Megatron then "
                            "uses rms_norm_eps in the q/kv latent norms, where transformers hard-codes 1e-6")


def add_strict(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--strict", action="store_true", help="NaN/Inf in a weight is an error instead of a warning")


def read_config(load_dir: Path) -> dict[str, Any]:
    path = load_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"--load-dir {load_dir}: missing config.json")
    return read_json(path)


def read_json(path: Path) -> Any:
    """A JSON file, or one error line naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def _globals(md: ModelSpec, section: Section) -> Step:
    return Step(section.message, section, None, P.global_shapes(md, md.vocab_size)[section.message])


def dense_plan(md: ModelSpec, sections: tuple[Section, Section, Section, Section] | None = None) -> list[Step]:
    """Embeddings, layers, final norm, output layer (untied) from a table's four sections."""
    embedding, layer, final_norm, output = sections or (dense.EMBEDDING, dense.LAYER, dense.FINAL_NORM, dense.OUTPUT)
    steps = [_globals(md, embedding)]
    steps += [Step(P.layer_message(i), layer, i, P.layer_shapes(md, i)) for i in range(md.num_layers)]
    steps.append(_globals(md, final_norm))
    if md.output_layer:
        steps.append(_globals(md, output))
    return steps


def _expert_steps(md: ModelSpec, message: str, layer: int, per_message: int,
                  experts: Section = deepseek.EXPERTS) -> list[Step]:
    num_experts = md.moe.num_experts if md.moe else 0
    return [
        Step(P.experts_message(message), experts, layer, P.expert_shapes(md, min(per_message, num_experts - first)),
             (first, min(per_message, num_experts - first)))
        for first in range(0, num_experts, per_message)
    ]


def moe_plan(md: ModelSpec, layer_section: Callable[[ModelSpec, int], Section], experts: Section,
             experts_per_message: int) -> list[Step]:
    """Embeddings, layers (each MoE layer followed by its experts), final norm, output layer (untied)."""
    steps = [_globals(md, dense.EMBEDDING)]
    for i in range(md.num_layers):
        steps.append(Step(P.layer_message(i), layer_section(md, i), i, P.layer_shapes(md, i)))
        if P.is_moe_layer(md, i):
            steps += _expert_steps(md, P.layer_message(i), i, experts_per_message, experts)
    steps.append(_globals(md, dense.FINAL_NORM))
    if md.output_layer:
        steps.append(_globals(md, dense.OUTPUT))
    return steps


def deepseek_plan(md: ModelSpec, experts_per_message: int,
                  layer_section: Callable[[ModelSpec, int], Section] = deepseek.layer_section,
                  experts: Section = deepseek.EXPERTS, mtp_layer: Section = deepseek.MTP_LAYER) -> list[Step]:
    """Embeddings, layers (each MoE layer followed by its experts), final norm, output, then MTP
    (DeepSeek-V3's tables unless given: GLM-4.5 has the same plan)."""
    steps = moe_plan(md, layer_section, experts, experts_per_message)
    for k in range(md.mtp_num_layers):
        layer = md.num_layers + k
        steps.append(Step(P.mtp_message(k), mtp_layer, layer, P.mtp_shapes(md)))
        steps += _expert_steps(md, P.mtp_message(k), layer, experts_per_message, experts)
    return steps


def validate(source: SafetensorsSource, md: ModelSpec, plan: list[Step], ignored: set[str]) -> None:
    """Run the whole plan on meta tensors: missing, misshapen and unmapped tensors fail here."""
    read: set[str] = set(ignored)

    def meta(name: str) -> torch.Tensor:
        if name not in source:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
        if source.dtype(name) not in WEIGHT_DTYPES:
            raise ConversionError(f"tensor {name!r} has dtype {source.dtype(name)}, not a floating-point weight dtype")
        read.add(name)
        return torch.empty(source.shape(name), dtype=source.dtype(name), device="meta")

    for step in plan:
        msg = step.build(meta, md)
        msg.pop(P.FIRST_EXPERT, None)
        P.check_shapes(msg, step.shapes, step.message)
    leftover = sorted(set(source.names()) - read)
    if leftover:
        more = f" (and {len(leftover) - 5} more)" if len(leftover) > 5 else ""
        raise ConversionError(f"unmapped tensors in the checkpoint: {', '.join(leftover[:5])}{more}")


def stream(queue: Any, source: SafetensorsSource, md: ModelSpec, plan: list[Step], what: str,
           args: argparse.Namespace) -> None:
    """Send the plan's messages; a worker of a shared conversion sends only the layers it writes."""
    md = dataclasses.replace(md, share_layers=layers_to_send(args, md))
    if md.share_layers is not None:
        plan = [step for step in plan if step.layer is None or step.layer in md.share_layers]
    P.send_spec(queue, md, args)
    read = getattr(source, "pending", source.get)  # deferred reads where the source offers them
    for step in progress(plan, len(plan), what):
        msg = step.build(read, md)
        msg["name"] = step.message
        P.check_finite(msg, args.strict)
        queue.put(msg)
    queue.put(P.DONE)


def check_copy(source: SafetensorsSource, copy: str, original: str) -> None:
    """A tensor the format stores twice must really be a copy."""
    if copy in source and not torch.equal(source.get(copy), source.get(original)):
        raise ConversionError(f"tensor {copy!r} should equal {original!r} but differs")


def qwen3_moe_experts(source: SafetensorsSource, md: ModelSpec) -> Section:
    """The experts' on-disk layout shared by Qwen3-MoE, GLM-4.5 and the MLA family: per expert (what
    transformers 5 saves) or fused [E, ...] (its in-memory parameters), decided by the first MoE layer;
    `validate` then holds every layer to it."""
    return qwen3_moe.hf_tables(md, source.__contains__).experts


def glm4_moe_plan(source: SafetensorsSource, cfg: dict[str, Any], args: argparse.Namespace,
                  per_message: int) -> tuple[ModelSpec, list[Step], set[str]]:
    """GLM-4.5's metadata, plan and the tensors it leaves unread: the MTP layers not converted (by default
    those config.json names and the checkpoint holds, since transformers saves a model without them) and
    the embedding/head copies of those converted (checked equal to the originals)."""
    layers = cfg.get("num_hidden_layers", 0)
    named = cfg.get("num_nextn_predict_layers", glm4_moe.DEFAULTS["num_nextn_predict_layers"]) or 0
    held = next((k for k in range(named) if f"model.layers.{layers + k}.eh_proj.weight" not in source), named)
    asked = getattr(args, "mtp_num_layers", None)
    mtp = held if asked is None else asked
    if not 0 <= mtp <= held:
        raise ConversionError(f"--mtp-num-layers {mtp}: the checkpoint holds {held} MTP layers "
                              f"(config.json num_nextn_predict_layers {named})")
    md = glm4_moe.metadata_from_hf(cfg, source.dtype("model.embed_tokens.weight"), mtp)
    if mtp and not md.output_layer:
        raise ConversionError("config.json: tie_word_embeddings true with MTP layers (whose shared_head.head copies lm_head) "
                              "is not a GLM-4.5 layout; pass --mtp-num-layers 0 to convert without them")
    plan = deepseek_plan(md, per_message, glm4_moe.layer_section, qwen3_moe_experts(source, md), glm4_moe.MTP_LAYER)
    skipped = {n for n in source.names() if any(n.startswith(f"model.layers.{layers + k}.") for k in range(mtp, held))}
    copies = {f"model.layers.{layers + k}.{c}": original for k in range(mtp) for c, original in glm4_moe.MTP_COPIES.items()}
    for copy, original in copies.items():
        check_copy(source, copy, original)
    if skipped:
        print(f"loader_hf: skipping the {len(skipped)} tensors of MTP layers {mtp}..{held - 1} (--mtp-num-layers {mtp})")
    if held < named:
        print(f"loader_hf: config.json names {named} MTP layers, the checkpoint holds {held} (transformers saves none)")
    return md, plan, skipped | {c for c in copies if c in source}


def load(queue: Any, args: argparse.Namespace) -> None:
    load_dir = Path(args.load_dir)
    cfg = read_config(load_dir)
    if (args.model_type_hf or cfg.get("model_type")) in (*deepseek.V3_MODEL_TYPES, *deepseek.V2_MODEL_TYPES):
        from .hf_deepseek_loader import load as load_mla  # it builds on this module

        return load_mla(queue, args)
    source = SafetensorsSource.from_dir(load_dir)
    embed_name = "model.embed_tokens.weight"
    if embed_name not in source:
        raise ConversionError(f"tensor {embed_name!r} is missing from the checkpoint")
    family, ignored = args.model_type_hf or cfg.get("model_type"), set()
    per_message = getattr(args, "experts_per_message", 8) or 8
    if per_message < 1 and family in (*SOFTMAX_MOE, glm4_moe.MODEL_TYPE):
        raise ConversionError("--experts-per-message must be >= 1")
    if family in SOFTMAX_MOE:  # Qwen3-MoE, Qwen2-MoE, Mixtral: the on-disk expert layout decided by the file
        md = SOFTMAX_MOE[family].metadata_from_hf(cfg, source.dtype(embed_name))
        tables = SOFTMAX_MOE[family].hf_tables(md, source.__contains__)
        plan = moe_plan(md, tables.layer_section, tables.experts, per_message)
    elif family == glm4_moe.MODEL_TYPE:
        md, plan, ignored = glm4_moe_plan(source, cfg, args, per_message)
    else:
        md = dense.metadata_from_hf(cfg, source.dtype(embed_name), args.model_type_hf)
        plan = dense_plan(md)
    if getattr(args, "mtp_num_layers", None) and family != glm4_moe.MODEL_TYPE:
        raise ConversionError(f"--mtp-num-layers: {family} has no MTP layers (DeepSeek-V3 is read by loader hf_deepseek3)")
    if args.true_vocab_size:
        md = dataclasses.replace(md, true_vocab_size=args.true_vocab_size)
    tied_copy = {"lm_head.weight"} if not md.output_layer and "lm_head.weight" in source else set()
    validate(source, md, plan, tied_copy | ignored)
    if tied_copy:  # some exporters keep the tied head; it must equal the embeddings
        check_copy(source, "lm_head.weight", embed_name)
    stream(queue, source, md, plan, "loader_hf", args)
