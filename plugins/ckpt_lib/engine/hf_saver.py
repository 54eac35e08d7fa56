"""Protocol messages -> HuggingFace safetensors shards + config.json, streamed tensor by tensor.

The shards are planned before the first message (`write_weights` run on meta tensors, `export_plan`), so each
shard's header is written first and every tensor goes into its place as its layer arrives: memory is a layer
and the queue's budget, whatever --max-shard-size."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..families import Section, deepseek, deepseek_v2, dense, experts_from_protocol, from_protocol, glm4_moe, hf_moe
from ..families.lora import LORA_A, LORA_B
from ..io import fp8
from ..io.manifest import Manifest, add_checksum_arguments, chosen_checksum
from ..io.safetensors_io import Group, Listing, ShardedWriter, parse_size, start_file
from ..io.staging import StagedDir, check_target
from ..layout.sharding import Joined, materialize
from ..transport import protocol as P
from ..transport.export_plan import Observed, ObservingReader, planned_reader
from ..transport.runtime import Summary, progress
from ..transport.spec import ModelSpec

# Files copied from --hf-config-dir besides config.json (tokenizer and generation settings).
COMPANION_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
# config.json fields that must agree with the checkpoint.
CONFIG_CHECKS = (
    ("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"), ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_query_groups"),
)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--hf-config-dir", type=str, default=None,
                       help="HF directory whose config.json (and tokenizer/generation files) describe the output")
    group.add_argument("--max-shard-size", type=str, default="5GB", help="Largest safetensors shard, e.g. 5GB, 500MB")
    group.add_argument("--true-vocab-size", type=int, default=None,
                       help="Rows of the output vocabulary (default: from the source, else config.json)")
    group.add_argument("--overwrite", action="store_true", help="Replace a non-empty --save-dir")
    add_checksum_arguments(group, "sha256", "sha256, what hubs compare: 0.55 s of CPU per GB; blake3: 0.2 s")
    group.add_argument("--save-fp8", action="store_true",
                       help="DeepSeek-V3 only: write the FP8 release layout (block-scaled float8_e4m3fn linear weights + _scale_inv)")
    group.add_argument("--fp8-block-size", type=int, default=None,
                       help="FP8 block size N ([N, N] blocks; default: the FP8 source's, else 128)")


def layer_section(md: ModelSpec, layer: int) -> Section:
    """The HF table of a decoder layer: DeepSeek-V3 (MLA), GLM-4.5 or Qwen3-MoE (experts without MLA) or dense."""
    if md.mla:
        return deepseek.layer_section(md, layer)
    return moe_family(md).layer_section(md, layer) if md.moe else dense.LAYER


def moe_family(md: ModelSpec) -> Any:
    """The family module of an MoE checkpoint without MLA, chosen from its metadata (see `glm4_moe.is_glm4_moe`,
    `hf_moe.for_metadata`)."""
    return glm4_moe if glm4_moe.is_glm4_moe(md) else hf_moe.for_metadata(md)


def output_config(args: argparse.Namespace, md: ModelSpec) -> dict[str, Any]:
    """config.json for the output: --hf-config-dir's, else the source's, else rebuilt; checked against md."""
    if args.hf_config_dir:
        path = Path(args.hf_config_dir) / "config.json"
        if not path.is_file():
            raise ConversionError(f"--hf-config-dir {args.hf_config_dir}: missing config.json")
        cfg = json.loads(path.read_text())
    elif md.hf_config:
        cfg = dict(md.hf_config)
    else:
        vocab = args.true_vocab_size or md.true_vocab_size
        if vocab is None:
            raise ConversionError("the vocabulary size is unknown: pass --true-vocab-size or --hf-config-dir")
        if md.mla:  # DeepSeek-V3 (sigmoid router) or -V2 (softmax), rope_scaling from the spec
            softmax = md.moe is not None and md.moe.router_score_function == "softmax"
            rebuild = deepseek_v2.hf_config_from_metadata if softmax else deepseek.hf_config_from_metadata
        else:  # an MoE model without MLA: its family's (Qwen3-MoE's refuses: it needs --hf-config-dir)
            rebuild = moe_family(md).hf_config_from_metadata if md.moe else dense.hf_config_from_metadata
        cfg = rebuild(md, vocab)
    for hf_key, md_key in CONFIG_CHECKS:
        if hf_key in cfg and cfg[hf_key] != getattr(md, md_key):
            raise ConversionError(f"config.json {hf_key}={cfg[hf_key]} disagrees with the checkpoint's {md_key}={getattr(md, md_key)}")
    if cfg.get("tie_word_embeddings", False) == bool(md.output_layer):
        raise ConversionError(f"config.json tie_word_embeddings={cfg.get('tie_word_embeddings', False)} disagrees with the checkpoint")
    if md.mla:
        deepseek.check_config(cfg, md)
        mtp = md.mtp_num_layers
        if mtp or "num_nextn_predict_layers" in cfg:  # the DeepSeek-V2 class has no such field
            cfg["num_nextn_predict_layers"] = mtp
    cfg["dtype"] = str(md.params_dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    return cfg


def save_adapters(reader: P.MessageReader, md: ModelSpec, args: argparse.Namespace) -> None:
    """A PEFT adapter directory: fused adapters split per HF projection through the family table
    (lora_B runs the base weight's inverse op, e.g. q/k/v de-interleaving; lora_A is shared)."""
    lora = md.lora_export
    assert lora is not None
    summary = Summary("saver_hf (PEFT adapter)")
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    rank = None
    for layer in range(md.num_layers):
        msg = reader.get(P.layer_message(layer))
        section = layer_section(md, layer)
        prefix = section.prefix.format(layer=layer)
        for rel in section.active(md):
            if f"{rel.keys[0]} {LORA_B}" not in msg:
                continue
            a_parts = [P.take(msg, f"{k} {LORA_A}") for k in rel.keys]
            b_parts = [materialize(b) for b in rel.op.backward(tuple(P.take(msg, f"{k} {LORA_B}") for k in rel.keys), md)]
            rank = a_parts[0].shape[0]
            for source, b in zip(rel.source, b_parts):
                module = "base_model.model." + prefix + source.removesuffix(".weight")
                tensors[f"{module}.lora_A.weight"] = a_parts[0]
                tensors[f"{module}.lora_B.weight"] = b
                targets.add(source.removesuffix(".weight").rsplit(".", 1)[-1])
        reader.finish(msg)
    end = reader.get_raw()
    if end != P.DONE:
        raise ConversionError(f"unexpected message '{end.get('name') if isinstance(end, dict) else end}'")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora.alpha if lora.alpha is not None else rank,
        "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": bool(lora.rslora), "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": args.hf_config_dir,
    }
    with StagedDir(args.save_dir, args.overwrite) as staged:
        manifest = Manifest(chosen_checksum(args, "sha256"))
        adapter = staged.path / "adapter_model.safetensors"
        size, finished = start_file(adapter, tensors, checksum=manifest.algorithm)
        summary.add_file(size)
        (staged.path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        manifest.record(adapter.name, tensors)
        manifest.checksum_from(adapter, finished)
        manifest.wait_for_files()
        manifest.write(staged.path)
        target = staged.commit()
    summary.notes.append(f"{len(tensors) // 2} adapted modules, r={rank}, targets {sorted(targets)}")
    summary.print(target)


def fp8_block(args: argparse.Namespace, md: ModelSpec) -> tuple[int, int] | None:
    """--save-fp8's block size (None without it): --fp8-block-size, else the FP8 source's, else 128."""
    if not getattr(args, "save_fp8", False):
        if getattr(args, "fp8_block_size", None) is not None:
            raise ConversionError("--fp8-block-size is used with --save-fp8 only")
        return None
    if md.lora_export:
        raise ConversionError("--save-fp8 writes a model, not a PEFT adapter (--save-lora-to-hf): use one of them")
    if md.mla is None:
        kind = "an MoE model" if md.moe else "a dense model"
        raise ConversionError(f"--save-fp8 writes DeepSeek-V3's FP8 release layout only; this checkpoint is {kind} "
                              "without MLA (not DeepSeek-V3): write it without --save-fp8")
    if args.fp8_block_size is not None:
        if args.fp8_block_size < 1:
            raise ConversionError(f"--fp8-block-size {args.fp8_block_size}: must be >= 1")
        return args.fp8_block_size, args.fp8_block_size
    return fp8.recorded_block(md.source_quantization, md.hf_config) or (128, 128)


def write_weights(reader: P.MessageReader, md: ModelSpec, vocab: int, block: tuple[int, int] | None, mtp: Section,
                  experts_out: Section, writer: ShardedWriter | Listing, planning: bool = False) -> dict[str, Any] | None:
    """Every weight, from the messages through the family tables into `writer`, in output order; returns the
    optimizer-state message if one came. Run first on the planned messages (meta tensors, `planning`), so that
    the writer knows the whole output, and where each shard ends, before the first message arrives."""
    mtp_layers = md.mtp_num_layers
    kept: dict[str, torch.Tensor] = {}  # vocabulary tables the MTP layer stores again

    def add(name: str, tensor: torch.Tensor | Joined) -> None:
        if block is None:
            writer.add(name, tensor)
            return
        tensor = materialize(tensor)
        if fp8.RELEASE_QUANTIZED.fullmatch(name):  # quantized as its shard is written
            weight = fp8.Fp8Weight(name, tensor, block)
            writer.add_together({name: weight, name + fp8.SCALE_SUFFIX: weight.scale})
        elif tensor.is_floating_point() and not name.endswith("e_score_correction_bias"):
            writer.add(name, tensor.to(torch.bfloat16))  # as released; the router bias stays fp32
        else:
            writer.add(name, tensor)

    def emit(msg: dict[str, Any], section: Section, layer: int | None = None) -> None:
        for name, tensor in from_protocol(section, msg, md, layer).items():
            if section in (dense.EMBEDDING, dense.OUTPUT):
                if tensor.shape[0] < vocab:
                    raise ConversionError(f"{name}: {tensor.shape[0]} rows, fewer than the vocabulary size {vocab}")
                tensor = tensor[:vocab]
                if mtp_layers:
                    kept[name] = tensor
            add(name, tensor)
        reader.finish(msg)

    def emit_layer(message: str, layer: int, section: Section, shapes: dict[str, tuple[int, ...]]) -> None:
        msg = reader.get(message)
        P.check_shapes(msg, shapes, message)
        emit(msg, section, layer)
        if P.is_moe_layer(md, layer):
            for first, experts in P.receive_experts(reader, message, md):
                for name, tensor in experts_from_protocol(experts_out, experts, md, layer, first).items():
                    add(name, tensor)

    emit(reader.get(P.EMBEDDINGS), dense.EMBEDDING)
    layers = range(md.num_layers)
    for layer in layers if planning else progress(layers, md.num_layers, "saver_hf"):
        emit_layer(P.layer_message(layer), layer, layer_section(md, layer), P.layer_shapes(md, layer))
    emit(reader.get(P.FINAL_NORM), dense.FINAL_NORM)
    if md.output_layer:
        emit(reader.get(P.OUTPUT_LAYER), dense.OUTPUT)
    for k in range(mtp_layers):
        layer = md.num_layers + k
        emit_layer(P.mtp_message(k), layer, mtp, P.mtp_shapes(md))
        for copy, original in deepseek.MTP_COPIES.items():  # the official layout repeats them
            add(f"model.layers.{layer}.{copy}", kept[original])
    return P.receive_end(reader)


def save(queue: Any, args: argparse.Namespace) -> None:
    observed = Observed(getattr(args, "experts_per_message", None) or 8)  # the loaders' default
    reader = ObservingReader(queue, getattr(args, "checking", True), observed)
    md = P.receive_spec(reader)
    block = fp8_block(args, md)
    if md.lora_export:
        check_target(args.save_dir, args.overwrite)
        return save_adapters(reader, md, args)
    if md.learned_absolute:
        raise ConversionError("learned absolute position embeddings have no HF dense-family equivalent")
    moe_without_mla = md.moe is not None and md.mla is None
    family = moe_family(md) if moe_without_mla else None
    if family is not glm4_moe and md.rotary_percent != 1.0:
        raise ConversionError(f"rotary_percent {md.rotary_percent} (partial rotary) has no place in this family's config.json")
    if family is not None:
        family.check(md)
    experts_out = family.EXPERTS if family is not None else deepseek.EXPERTS  # written per expert, in the family's names
    check_target(args.save_dir, args.overwrite)
    cfg = output_config(args, md)
    if family is not None:
        family.check_config(cfg, md)
    vocab = args.true_vocab_size or cfg.get("vocab_size") or md.true_vocab_size
    summary = Summary("saver_hf")
    mtp = glm4_moe.MTP_LAYER if family is glm4_moe else deepseek.MTP_LAYER

    def plan() -> list[Group]:
        listing = Listing()
        write_weights(planned_reader(md, vocab, observed, reader.checking), md, vocab, block, mtp, experts_out, listing,
                      planning=True)
        return listing.groups

    with StagedDir(args.save_dir, args.overwrite) as staged:
        manifest = Manifest(chosen_checksum(args, "sha256"))
        with ShardedWriter(staged.path, plan(), parse_size(args.max_shard_size), manifest.algorithm, replan=plan) as writer:
            if write_weights(reader, md, vocab, block, mtp, experts_out, writer) is not None:
                print("note: saver_hf: the optimizer state has no place in an HF checkpoint; ignored", flush=True)
            shards = writer.close()
        for path, (tensors, finished) in shards.items():
            summary.add_file(path.stat().st_size)
            manifest.record(path.name, tensors)
            manifest.checksum_from(path, finished)
        cfg["vocab_size"] = vocab
        # The weights arrive dequantized (an FP8 source's config.json is kept in hf_config, or given with
        # --hf-config-dir): a quantization_config would make transformers expect FP8 tensors and scales.
        if cfg.pop("quantization_config", None) is not None and block is None:
            summary.notes.append("FP8 source written dequantized: quantization_config left out of config.json")
        if block is not None:
            cfg["quantization_config"] = fp8.quantization_config(block)
            cfg["dtype"] = "bfloat16"
            summary.notes.append(f"FP8 (e4m3, blocks of {list(block)}) as DeepSeek releases it")
        (staged.path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if args.hf_config_dir:
            for name in COMPANION_FILES:
                src = Path(args.hf_config_dir) / name
                if src.is_file():
                    shutil.copy2(src, staged.path / name)
        manifest.write(staged.path)
        target = staged.commit()
    summary.notes.append(f"{cfg.get('architectures', ['?'])[0]} dtype {cfg['dtype']} vocab {vocab}")
    summary.print(target)
