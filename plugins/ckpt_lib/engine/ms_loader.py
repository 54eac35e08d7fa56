"""MindSpore Transformers safetensors -> protocol (dense GPT), streaming from the files.

Keeps the command line of the upstream MindSpore loader (seed 002) but reads the architecture from
the tensors: the model flags are optional and, when given, cross-checked (a mismatch names both
values). Non-weight entries (optimizer states, counters, router bookkeeping) are skipped and
counted; any other unknown tensor is an error. No intermediate checkpoint is written unless
`--ms2torch-ckpt-path` is given.

MoE checkpoints (DeepSeek-V3 with MLA and MTP, Qwen3-MoE) produce the same messages as the HF
DeepSeek-V3 loader. Their router settings, RoPE base and norm epsilon are not in the tensors, so
they come from the HF `config.json` given with `--model-config` and are cross-checked against the
tensors; routed experts are read from the grouped `weight1` / `weight2` one expert's rows at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..families import Section, deepseek, dense
from ..families import mindspore as ms
from ..io.safetensors_io import SafetensorsSource
from ..transport import protocol as P
from ..transport.spec import ModelSpec, MoESpec
from . import ms_distributed as distributed
from .hf_loader import Step, dense_plan, read_json, stream, validate

LAYER_INDEX = re.compile(r"^(?:decoder|model)\.layers\.(\d+)\.")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--megatron-path", type=str, default=None, help="Accepted for compatibility; not needed")
    group.add_argument("--loader-transformer-impl", choices=["local", "transformer_engine"], default=None,
                       help="Accepted for compatibility (the source is MindSpore; the saver picks the target naming)")
    group.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default=None,
                       help="Checked against the tensors (seed default learned_absolute; these models use rope)")
    group.add_argument("--true-vocab-size", type=int, default=None, help="Real vocabulary size (trims padding)")
    group.add_argument("--padded-vocab-size", type=int, default=None, help="Checked against the embedding rows")
    for flag, what in (("--num-layers", "Transformer layers"), ("--seq-length", "Sequence length"),
                       ("--hidden-size", "Hidden size"), ("--ffn-hidden-size", "FFN hidden size"),
                       ("--num-attention-heads", "Attention heads (needed when the tensors cannot tell)"),
                       ("--num-query-groups", "Query groups"), ("--kv-channels", "Head dim")):
        group.add_argument(flag, type=int, default=None, help=f"{what}; checked against the tensors when given")
    group.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default=None, help="Checked (RMSNorm)")
    group.add_argument("--add-bias-linear", action="store_true", default=None, help="Checked against the tensors")
    group.add_argument("--swiglu", action="store_true", default=None, help="Checked against the tensors")
    group.add_argument("--ms2torch-ckpt-path", type=str, default=None,
                       help="Also write the MindSpore weights as one torch file here (only when given; holds the model in memory)")
    group.add_argument("--params-dtype", choices=sorted(P.DTYPES), default=None,
                       help="dtype of the converted weights (default bf16, as the seed); rounded once from fp32")
    group.add_argument("--qkv-layout", choices=["interleaved", "contiguous"], default="interleaved",
                       help="linear_qkv layout: Megatron-interleaved (mindformers >= 1.7 default, "
                            "use_contiguous_weight_layout_attention: False) or plain [Q;K;V] (1.6 default)")
    group.add_argument("--fc1-layout", choices=["interleaved", "contiguous"], default="interleaved",
                       help="linear_fc1 layout: row-interleaved gate/up (default since 1.7, use_interleaved_weight_layout_mlp: "
                            "True) or [gate; up]")
    group.add_argument("--strict", action="store_true", help="NaN/Inf in a weight is an error instead of a warning")
    group.add_argument("--model-config", type=str, default=None,
                       help="MoE checkpoints (DeepSeek-V3, Qwen3-MoE): the HF config.json (or its directory) with the router "
                            "settings, RoPE base and norm epsilon the tensors do not record; cross-checked against the tensors")
    group.add_argument("--mtp-num-layers", type=int, default=None,
                       help="MTP layers to convert: 0 skips (and reports) them; default: as many as the checkpoint holds (at most 1)")
    group.add_argument("--experts-per-message", type=int, default=8,
                       help="Routed experts per queue message (bounds the memory of one message)")
    group.add_argument("--strategy-path", type=str, default=None,
                       help="Checkpoint 1.0 training output: the strategy/ directory (ckpt_strategy_rank_N.ckpt) or one merged "
                            "strategy file (default: strategy/ beside or above the rank_N directories)")


def open_source(load_dir: Path, strategy_path: str | None = None) -> SafetensorsSource | distributed.ShardedSource:
    """A .safetensors file, a directory of them, a merged directory with param_name_map.json, or a training
    run's output: Checkpoint 1.0 (rank_N directories + strategy files) or 2.0 (iteration directory)."""
    if load_dir.is_file():
        return SafetensorsSource([load_dir])
    if not load_dir.is_dir():
        raise ConversionError(f"--load-dir {load_dir}: no such file or directory")
    if distributed.is_checkpoint_1(load_dir):
        return distributed.open_checkpoint_1(load_dir, strategy_path)
    iteration = distributed.iteration_dir(load_dir)
    if iteration is not None:
        if (iteration / "metadata.json").is_file():
            return distributed.open_checkpoint_2(iteration)
        load_dir = iteration  # saved by a single device: whole tensors, no metadata.json
    name_map = load_dir / "param_name_map.json"
    if name_map.exists():
        try:
            files = sorted(set(json.loads(name_map.read_text()).values()))
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConversionError(f"{name_map}: invalid ({e})") from None
        missing = [f for f in files if not (load_dir / f).exists()]
        if missing:
            raise ConversionError(f"{name_map} lists {missing[0]}, which is missing")
        return SafetensorsSource(load_dir / f for f in files)
    files = sorted(p for p in load_dir.glob("*.safetensors") if p.name != "hyper_param.safetensors" and not p.name.startswith("opt-"))
    if not files:
        raise ConversionError(f"--load-dir {load_dir}: no .safetensors files found")
    return SafetensorsSource(files)


def _check(flag: str, given: Any, found: Any) -> None:
    if given is not None and given != found:
        raise ConversionError(f"{flag} {given} contradicts the checkpoint, which has {found}")


def infer_metadata(source: SafetensorsSource, names: list[str], args: argparse.Namespace) -> tuple[argparse.Namespace, tuple]:
    """Architecture from the tensors, cross-checked against the flags given."""
    legacy = "model.tok_embeddings.embedding_weight" in source
    if not legacy and "embedding.word_embeddings.weight" not in source:
        raise ConversionError("not a MindSpore Transformers GPT checkpoint: no embedding.word_embeddings.weight "
                              "or model.tok_embeddings.embedding_weight")
    p = "model.layers.{}." if legacy else "decoder.layers.{}."
    emb = source.shape("model.tok_embeddings.embedding_weight" if legacy else "embedding.word_embeddings.weight")
    vocab, hidden = emb
    layers = len({int(m[1]) for n in names if (m := LAYER_INDEX.match(n))})
    fc2 = source.shape(p.format(0) + ("feed_forward.w2.weight" if legacy else "mlp.linear_fc2.weight"))
    ffn = fc2[1]
    fused_qkv = legacy and p.format(0) + "attention.w_qkv.weight" in source
    fused_fc1 = legacy and p.format(0) + "feed_forward.w_gate_hidden.weight" in source
    qk_norm = not legacy and p.format(0) + "self_attention.q_layernorm.weight" in source
    proj = source.shape(p.format(0) + ("attention.wo.weight" if legacy else "self_attention.linear_proj.weight"))
    head_dim = source.shape(p.format(0) + "self_attention.q_layernorm.weight")[0] if qk_norm else args.kv_channels
    heads = args.num_attention_heads
    if heads is None and head_dim:
        heads = proj[1] // head_dim
    if heads is None:
        raise ConversionError("cannot infer the number of attention heads from this checkpoint: pass --num-attention-heads")
    head_dim = head_dim or proj[1] // heads
    if legacy and not fused_qkv:
        groups = source.shape(p.format(0) + "attention.wk.weight")[0] // head_dim
        qkv_bias = p.format(0) + "attention.wq.bias" in source
    else:
        qkv_name = p.format(0) + ("attention.w_qkv.weight" if legacy else "self_attention.linear_qkv.weight")
        groups = (source.shape(qkv_name)[0] // head_dim - heads) // 2
        qkv_bias = qkv_name.replace(".weight", ".bias") in source
    untied = ("lm_head.weight" if legacy else "output_layer.weight") in source
    fc1_rows = source.shape(p.format(0) + ("feed_forward.w1.weight" if legacy and not fused_fc1 else
                                           "feed_forward.w_gate_hidden.weight" if legacy else "mlp.linear_fc1.weight"))[0]
    swiglu = legacy or fc1_rows == 2 * ffn
    for flag, given, found in (("--num-layers", args.num_layers, layers), ("--hidden-size", args.hidden_size, hidden),
                               ("--ffn-hidden-size", args.ffn_hidden_size, ffn), ("--num-attention-heads", args.num_attention_heads, heads),
                               ("--num-query-groups", args.num_query_groups, groups), ("--kv-channels", args.kv_channels, head_dim),
                               ("--padded-vocab-size", args.padded_vocab_size, vocab), ("--position-embedding-type", args.position_embedding_type, "rope"),
                               ("--normalization", args.normalization, "RMSNorm"), ("--swiglu", args.swiglu, swiglu or None),
                               ("--add-bias-linear", args.add_bias_linear, None)):
        _check(flag, given, found)
    if not swiglu:
        raise ConversionError("linear_fc1 is not a gated (SwiGLU) projection; only SwiGLU models are supported")
    params_dtype = P.DTYPES[args.params_dtype or "bf16"]
    md = ModelSpec(
        model_type="GPT", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim, seq_length=args.seq_length or 4096,
        max_position_embeddings=args.seq_length or 4096, tokenizer_type="HuggingFaceTokenizer", iteration=1,
        params_dtype=params_dtype, bert_binary_head=False, output_layer=untied, position_embedding_type="rope",
        linear_bias=False, qkv_bias=qkv_bias, norm_has_bias=False, swiglu=True,
        true_vocab_size=args.true_vocab_size or vocab, vocab_size=vocab, make_vocab_size_divisible_by=128,
        previous_tensor_parallel_size=1, previous_pipeline_parallel_size=1, consumed_train_samples=0,
        consumed_valid_samples=0, normalization="RMSNorm", norm_epsilon=1e-6, rotary_base=10000.0,
        qk_layernorm=qk_norm, hf_config=None,
    )
    sections = (ms.legacy_sections(fused_qkv, fused_fc1, args.qkv_layout == "interleaved") if legacy else
                ms.mcore_sections(args.qkv_layout == "interleaved", args.fc1_layout == "interleaved"))
    return md, sections


class GroupedExperts:
    """The checkpoint as the plan reads it: mindformers' grouped `weight1` / `weight2` served as one
    tensor per expert and part (`...weight1[e].gate`), read as that expert's rows only; every
    floating tensor rounded once to `cast` except the router's fp32 expert bias."""

    def __init__(self, source: SafetensorsSource, md: ModelSpec, cast: torch.dtype) -> None:
        self.source, self.files, self.cast = source, source.files, cast
        self.experts: dict[str, tuple[str, int, str]] = {}  # served name -> (grouped name, expert, part)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.last: tuple[tuple[str, int], torch.Tensor] | None = None
        assert md.moe is not None
        e = self.num_experts = md.moe.num_experts
        width = md.moe.ffn_hidden_size
        for name in source.names():
            grouped = next((g for g in ms.GROUPED if name.endswith("." + g)), None)
            if grouped is None or ms.is_non_weight(name):  # adam_m/adam_v of the experts: skipped whole (a rank's slice in training output)
                continue
            rows, cols = source.shape(name)
            want = md.hidden_size if grouped == ms.GROUPED_FC1 else width
            if rows != e * want or (grouped == ms.GROUPED_FC1 and cols != 2 * width):
                raise ConversionError(f"tensor {name!r} has shape {[rows, cols]}, expected "
                                      f"{[e * want, 2 * width if grouped == ms.GROUPED_FC1 else md.hidden_size]} "
                                      f"for {e} experts, hidden {md.hidden_size}, expert ffn {width}")
            prefix = name[: -len(grouped)]
            for expert in range(e):
                for part in ms.GROUPED[grouped]:
                    served = prefix + part.format(expert=expert)
                    self.experts[served] = (name, expert, part)
                    self.shapes[served] = tuple(ms.expert_part(torch.empty(want, cols, device="meta"), part).shape)
        self.grouped = {g for g, _, _ in self.experts.values()}

    def __contains__(self, name: str) -> bool:
        return name in self.experts or (name in self.source and name not in self.grouped)

    def names(self) -> list[str]:
        return [n for n in self.source.names() if n not in self.grouped] + list(self.experts)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name] if name in self.experts else self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.experts[name][0] if name in self.experts else name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.experts:
            grouped, expert, part = self.experts[name]
            tensor = ms.expert_part(self._rows(grouped, expert), part)
        else:
            tensor = self.source.get(name)
        if tensor.is_floating_point() and not name.endswith("router.expert_bias"):  # Megatron keeps it fp32
            tensor = tensor.to(self.cast)
        return tensor

    def _rows(self, grouped: str, expert: int) -> torch.Tensor:
        """One expert's rows of a grouped tensor, read alone (gate and up share a read)."""
        if self.last is not None and self.last[0] == (grouped, expert):
            return self.last[1]
        rows = self.source.shape(grouped)[0] // self.num_experts
        tensor = self.source.pending(grouped).rows(expert * rows, rows).load()
        self.last = ((grouped, expert), tensor)
        return tensor


def read_model_config(path: str | None) -> dict[str, Any]:
    if path is None:
        raise ConversionError("this is an MoE checkpoint: pass --model-config with the model's HF config.json (router top-k, "
                              "groups, scaling, RoPE base and norm epsilon are not stored in MindSpore checkpoints)")
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConversionError(f"--model-config {path}: no config.json there")
    return read_json(file)


def infer_moe_metadata(source: SafetensorsSource, names: list[str], args: argparse.Namespace) -> tuple[ModelSpec, ms.MoeTables]:
    """The MoE model spec from --model-config (as the HF loaders build it), cross-checked against the tensors."""
    cfg = read_model_config(args.model_config)
    dtype = P.DTYPES[args.params_dtype or "bf16"]
    layers = sorted({int(m[1]) for n in names if (m := LAYER_INDEX.match(n))})
    mtp_found = len({n.split(".")[2] for n in names if n.startswith("mtp.layers.")})
    mtp = mtp_found if args.mtp_num_layers is None else args.mtp_num_layers
    if mtp > mtp_found or mtp > 1:
        raise ConversionError(f"--mtp-num-layers {mtp}: the checkpoint holds {mtp_found} MTP layers (at most 1 is supported)")
    first = "decoder.layers.0.self_attention."
    mla = first + "linear_kvb.weight" in source or first + "linear_kv_up_proj.weight" in source
    if cfg.get("model_type") == "deepseek_v3":
        if not mla:
            raise ConversionError("--model-config is DeepSeek-V3 but the checkpoint has no MLA tensors (linear_kvb / linear_kv_up_proj)")
        md = deepseek.metadata_from_hf(cfg, dtype, mtp)
    elif cfg.get("model_type") == "qwen3_moe":
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ConversionError("config.json: Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
        deepseek.check_normalised_top_k(cfg, default=False)
        md = dataclasses.replace(dense.metadata_from_hf(cfg, dtype, "qwen3"), moe=MoESpec(
            num_experts=cfg.get("num_experts") or cfg.get("num_local_experts"), ffn_hidden_size=cfg["moe_intermediate_size"],
            first_k_dense_replace=0, router_topk=cfg["num_experts_per_tok"], router_score_function="softmax",
            router_enable_expert_bias=False))
    else:
        raise ConversionError(f"--model-config: model_type {cfg.get('model_type')!r} is not an MoE family this loader reads "
                              "(deepseek_v3, qwen3_moe)")
    assert md.moe is not None
    vocab, hidden = source.shape("embedding.word_embeddings.weight")
    router = source.shape(f"decoder.layers.{md.moe.first_k_dense_replace}.mlp.router.weight") if \
        f"decoder.layers.{md.moe.first_k_dense_replace}.mlp.router.weight" in source else None
    for what, given, found in (("num_hidden_layers", md.num_layers, len(layers)), ("hidden_size", md.hidden_size, hidden),
                               ("routed experts", md.moe.num_experts, router[0] if router else None),
                               ("tie_word_embeddings", not md.output_layer, "output_layer.weight" not in source)):
        if given != found:
            raise ConversionError(f"--model-config {what} {given} contradicts the checkpoint, which has {found}")
    if vocab < md.true_vocab_size:
        raise ConversionError(f"--model-config vocab_size {md.true_vocab_size} exceeds the embedding's {vocab} rows")
    md = dataclasses.replace(md, vocab_size=vocab, true_vocab_size=args.true_vocab_size or md.true_vocab_size)
    return md, ms.moe_sections(args.qkv_layout == "interleaved", args.fc1_layout == "interleaved", mla,
                               first + "linear_qkv.weight" in source and mla, mtp)


def _global_step(md: ModelSpec, section: Section) -> Step:
    return Step(section.message, section, None, P.global_shapes(md, md.vocab_size)[section.message])


def _expert_steps(md: ModelSpec, message: str, section: Section, layer: int, per_message: int) -> list[Step]:
    experts = md.moe.num_experts if md.moe else 0
    return [Step(P.experts_message(message), section, layer, P.expert_shapes(md, min(per_message, experts - first)),
                 (first, min(per_message, experts - first))) for first in range(0, experts, per_message)]


def moe_plan(md: ModelSpec, tables: ms.MoeTables, per_message: int) -> list[Step]:
    """The HF DeepSeek-V3 loader's message order: layers (MoE ones followed by their experts), final
    norm, output layer, then the MTP layer and its experts."""
    embedding, dense_layer, final_norm, output = tables.dense
    steps = [_global_step(md, embedding)]
    for i in range(md.num_layers):
        moe = P.is_moe_layer(md, i)
        steps.append(Step(P.layer_message(i), tables.moe_layer if moe else dense_layer, i, P.layer_shapes(md, i)))
        if moe:
            steps += _expert_steps(md, P.layer_message(i), tables.experts, i, per_message)
    steps.append(_global_step(md, final_norm))
    if md.output_layer:
        steps.append(_global_step(md, output))
    for k in range(md.mtp_num_layers):
        steps.append(Step(P.mtp_message(k), tables.mtp[k], md.num_layers + k, P.mtp_shapes(md)))
        steps += _expert_steps(md, P.mtp_message(k), tables.mtp_experts[k], md.num_layers + k, per_message)
    return steps


def load_moe(queue: Any, source: SafetensorsSource, weights: list[str], skipped: list[str], args: argparse.Namespace) -> None:
    if args.experts_per_message < 1:
        raise ConversionError("--experts-per-message must be >= 1")
    md, tables = infer_moe_metadata(source, weights, args)
    view = GroupedExperts(source, md, md.params_dtype)
    ignored = set(skipped)
    if not md.mtp_num_layers:
        mtp = {n for n in weights if n.startswith("mtp.layers.")}
        if mtp:
            print(f"loader_core_mf: skipping the {len(mtp)} MTP tensors (--mtp-num-layers 0)", flush=True)
            ignored |= {n for n in view.names() if n.startswith("mtp.layers.")}
    plan = moe_plan(md, tables, args.experts_per_message)
    validate(view, md, plan, ignored)
    print(f"loader_core_mf: MoE ({md.moe.num_experts if md.moe else 0} experts{', MLA' if md.mla else ''}"
          f"{', MTP' if md.mtp_num_layers else ''}), {len(weights)} weights, skipped {len(skipped)} non-weight entries", flush=True)
    stream(queue, view, md, plan, "loader_core_mf", args)


def load(queue: Any, args: argparse.Namespace) -> None:
    source = open_source(Path(args.load_dir), args.strategy_path)
    metadata = {k: v for f in source.files for k, v in f.metadata.items()}
    skipped = [n for n in source.names() if ms.is_non_weight(n)]
    weights = [n for n in source.names() if not ms.is_non_weight(n)]
    if any(n.endswith((".mlp.router.weight", "." + ms.GROUPED_FC1)) for n in weights):
        return load_moe(queue, source, weights, skipped, args)
    md, sections = infer_metadata(source, weights, args)
    plan = dense_plan(md, sections)
    validate(source, md, plan, set(skipped))
    fmt = metadata.get("format", "unknown")
    print(f"loader_core_mf: format {fmt!r}, {len(weights)} weights, skipped {len(skipped)} non-weight entries"
          + (f" ({', '.join(sorted(skipped)[:4])}{', ...' if len(skipped) > 4 else ''})" if skipped else ""), flush=True)
    if args.ms2torch_ckpt_path:
        target = Path(args.ms2torch_ckpt_path)
        target.mkdir(parents=True, exist_ok=True)
        torch.save({n: source.get(n).clone() for n in weights}, target / "ms2pt_checkpoint.pt")
        print(f"loader_core_mf: wrote the intermediate checkpoint {target / 'ms2pt_checkpoint.pt'}", flush=True)
    plan = [dataclasses.replace(step, cast=md.params_dtype) for step in plan]  # fp32 -> bf16 rounds once
    stream(queue, source, md, plan, "loader_core_mf", args)
