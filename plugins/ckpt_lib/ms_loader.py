"""MindSpore Transformers safetensors -> protocol (dense GPT), streaming from the files.

Keeps the command line of the upstream MindSpore loader (seed 002) but reads the architecture from
the tensors: the model flags are optional and, when given, cross-checked (a mismatch names both
values). Non-weight entries (optimizer states, counters, router bookkeeping) are skipped and
counted; any other unknown tensor is an error. No intermediate checkpoint is written unless
`--ms2torch-ckpt-path` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from . import protocol as P
from .errors import ConversionError
from .families import mindspore as ms
from .hf_loader import dense_plan, stream, validate
from .safetensors_io import SafetensorsSource

LAYER_INDEX = re.compile(r"^(?:decoder|model)\.layers\.(\d+)\.")
MERGE_HINT = ("merge the distributed checkpoint into complete weights first (MindSpore Transformers: "
              "`python toolkit/safetensors/unified_safetensors.py` or `mindformers.tools.ckpt_transform`, "
              "see its 'weight merging' docs), then pass the merged file or directory")


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


def open_source(load_dir: Path) -> SafetensorsSource:
    """A .safetensors file, a directory of them, or a merged directory with param_name_map.json."""
    if load_dir.is_file():
        return SafetensorsSource([load_dir])
    if not load_dir.is_dir():
        raise ConversionError(f"--load-dir {load_dir}: no such file or directory")
    if any(d.is_dir() and d.name.startswith("rank_") for d in load_dir.iterdir()) or any(load_dir.glob("*strategy*")):
        raise ConversionError(f"--load-dir {load_dir} holds per-rank (distributed) weights: {MERGE_HINT}")
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
    files = sorted(p for p in load_dir.glob("*.safetensors") if p.name != "hyper_param.safetensors")
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
    md = P.make_metadata(
        model_type="GPT", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim, seq_length=args.seq_length or 4096,
        max_position_embeddings=args.seq_length or 4096, tokenizer_type="HuggingFaceTokenizer", iteration=1,
        params_dtype=params_dtype, bert_binary_head=False, output_layer=untied, position_embedding_type="rope",
        linear_bias=False, qkv_bias=qkv_bias, norm_has_bias=False, swiglu=True,
        true_vocab_size=args.true_vocab_size or vocab, vocab_size=vocab, make_vocab_size_divisible_by=128, num_experts=None,
        previous_tensor_parallel_size=1, previous_pipeline_parallel_size=1, consumed_train_samples=0,
        consumed_valid_samples=0, normalization="RMSNorm", norm_epsilon=1e-6, rotary_base=10000.0,
        qk_layernorm=qk_norm, hf_config=None,
    )
    sections = (ms.legacy_sections(fused_qkv, fused_fc1, args.qkv_layout == "interleaved") if legacy else
                ms.mcore_sections(args.qkv_layout == "interleaved", args.fc1_layout == "interleaved"))
    return md, sections


def load(queue: Any, args: argparse.Namespace) -> None:
    source = open_source(Path(args.load_dir))
    metadata = {k: v for f in source.files for k, v in f.metadata.items()}
    skipped = [n for n in source.names() if ms.is_non_weight(n)]
    weights = [n for n in source.names() if not ms.is_non_weight(n)]
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
    stream(queue, source, md, plan, "loader_core_mf", args.strict)
