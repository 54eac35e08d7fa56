"""Megatron-LM `tools/checkpoint` queue protocol: message names, keys, metadata, checked receive.

Upstream names are kept exactly (REFERENCE §1). Extensions, all optional and announced in the
metadata so upstream savers never see a key they do not expect unless the model needs it:
- `md.qk_layernorm` and layer keys `q norm weight` / `k norm weight` (Qwen3-style q/k RMSNorm);
- `md.ffn_hidden_size`, `md.num_query_groups`, `md.kv_channels`, `md.normalization`,
  `md.norm_epsilon`, `md.rotary_base`, `md.vocab_size` mirrored at top level for savers that do
  not read `checkpoint_args`;
- `md.hf_config` (the source HF `config.json` as a dict, or None) so mcore -> HF can restore it;
- `md.rope_scaling`: None (plain RoPE) or MLA's YaRN parameters (see rope_scaling.py);
- `md.rotary_percent` (Megatron's `--rotary-percent`, absent: 1.0): RoPE on the first fraction of each
  head's dimensions (GLM-4.5's `partial_rotary_factor`);
- `md.hf_model_type` (absent: None): the HF family the loader read (`glm4_moe`), so that `saver_hf`
  writes the same family back when no HF config travels with the checkpoint;
- MoE layers without shared experts (`md.moe_shared_expert_intermediate_size` None) or without a
  router expert bias (`md.moe_router_enable_expert_bias` False) carry no such keys.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConversionError

EMBEDDINGS = "embeddings"
FINAL_NORM = "final norm"
OUTPUT_LAYER = "output layer"
OPTIMIZER_STATE = "optimizer state"  # optional, last before "done" (optimizer_state.py)
DONE = "done"
EXIT = "exit"


def layer_message(index: int) -> str:
    return f"transformer layer {index}"


# Per-layer keys (upstream) and extensions.
INPUT_NORM_W, INPUT_NORM_B = "input norm weight", "input norm bias"
QKV_W, QKV_B = "qkv weight", "qkv bias"
DENSE_W, DENSE_B = "dense weight", "dense bias"
POST_NORM_W, POST_NORM_B = "post norm weight", "post norm bias"
FC1_W, FC1_B = "mlp l0 weight", "mlp l0 bias"
FC1_GATE_W, FC1_UP_W = "mlp l0 weight W", "mlp l0 weight V"
FC1_GATE_B, FC1_UP_B = "mlp l0 bias W", "mlp l0 bias V"
FC2_W, FC2_B = "mlp l1 weight", "mlp l1 bias"
Q_NORM_W, K_NORM_W = "q norm weight", "k norm weight"
WORD_EMB, POS_EMB = "word embeddings", "position embeddings"
# MLA (DeepSeek-V3) attention; without a query LoRA rank (`md.q_lora_rank` None: DeepSeek-V2-Lite, Moonlight)
# one plain query projection `Q_W` replaces the down projection, its norm and the up projection.
Q_DOWN_W, Q_DOWN_NORM_W, Q_UP_W = "q down weight", "q down norm weight", "q up weight"
Q_W = "q weight"
KV_DOWN_W, KV_DOWN_NORM_W, KV_UP_W = "kv down weight", "kv down norm weight", "kv up weight"
# MoE: router, shared expert, routed experts (stacked [count, out, in] in FC1_GATE_W/FC1_UP_W/FC2_W).
ROUTER_W, ROUTER_BIAS = "router weight", "router expert bias"
SHARED_FC1_GATE_W, SHARED_FC1_UP_W, SHARED_FC2_W = "shared mlp l0 weight W", "shared mlp l0 weight V", "shared mlp l1 weight"
FIRST_EXPERT = "first expert"
# Multi-token prediction layer (its transformer layer uses the layer keys above).
MTP_ENORM_W, MTP_HNORM_W, MTP_EH_PROJ_W, MTP_NORM_W = "enorm weight", "hnorm weight", "eh proj weight", "mtp norm weight"


def experts_message(layer_message_name: str) -> str:
    """Routed experts of a layer follow its message, in one or more messages of this name."""
    return f"{layer_message_name} experts"


def mtp_message(index: int) -> str:
    return f"mtp layer {index}"


def is_moe_layer(md: argparse.Namespace, layer: int) -> bool:
    """DeepSeek-style: the first `first_k_dense_replace` layers are dense, the rest MoE (MTP is MoE)."""
    return bool(getattr(md, "num_experts", None)) and layer >= getattr(md, "first_k_dense_replace", 0)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Fields every metadata Namespace carries (upstream saver_core reads all of these).
UPSTREAM_FIELDS = (
    "model_type", "num_layers", "hidden_size", "seq_length", "num_attention_heads",
    "max_position_embeddings", "tokenizer_type", "iteration", "params_dtype", "bert_binary_head",
    "output_layer", "position_embedding_type", "linear_bias", "qkv_bias", "norm_has_bias", "swiglu",
    "true_vocab_size", "make_vocab_size_divisible_by", "num_experts", "previous_tensor_parallel_size",
    "previous_pipeline_parallel_size", "consumed_train_samples", "consumed_valid_samples",
)
EXTENSION_FIELDS = (
    "ffn_hidden_size", "num_query_groups", "kv_channels", "normalization", "norm_epsilon",
    "rotary_base", "qk_layernorm", "vocab_size", "hf_config",
)


def make_metadata(**fields: Any) -> argparse.Namespace:
    """Metadata for the first queue message, valid for upstream `saver_core` and ours.

    `checkpoint_args` mirrors the model fields under Megatron's argument names, since upstream
    savers copy model options from there.
    """
    missing = [f for f in UPSTREAM_FIELDS + EXTENSION_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"metadata is missing {missing}")
    md = argparse.Namespace(**fields)
    md.checkpoint_args = argparse.Namespace(
        num_layers=md.num_layers,
        hidden_size=md.hidden_size,
        ffn_hidden_size=md.ffn_hidden_size,
        num_attention_heads=md.num_attention_heads,
        num_query_groups=md.num_query_groups,
        group_query_attention=md.num_query_groups != md.num_attention_heads,
        kv_channels=md.kv_channels,
        max_position_embeddings=md.max_position_embeddings,
        seq_length=md.seq_length,
        position_embedding_type=md.position_embedding_type,
        rotary_base=md.rotary_base,
        normalization=md.normalization,
        norm_epsilon=md.norm_epsilon,
        swiglu=md.swiglu,
        add_bias_linear=md.linear_bias,
        add_qkv_bias=md.qkv_bias,
        qk_layernorm=md.qk_layernorm,
        untie_embeddings_and_output_weights=md.output_layer,
        sequence_parallel=False,
        apply_query_key_layer_scaling=False,
        tokenizer_type=md.tokenizer_type,
        params_dtype=md.params_dtype,
        bf16=md.params_dtype == torch.bfloat16,
        fp16=md.params_dtype == torch.float16,
        make_vocab_size_divisible_by=md.make_vocab_size_divisible_by,
    )
    return md


class LoaderExited(Exception):
    """The loader put "exit" on the queue."""


class MessageReader:
    """Receives queue messages in protocol order and rejects unexpected or leftover keys."""

    def __init__(self, queue: Any, checking: bool = True) -> None:
        self.queue = queue
        self.checking = checking

    def get_raw(self) -> Any:
        msg = self.queue.get()
        if isinstance(msg, str) and msg == EXIT:
            raise LoaderExited("the loader failed; nothing was written")
        return msg

    def get(self, name: str) -> dict[str, Any]:
        msg = self.get_raw()
        got = msg if isinstance(msg, str) else msg.get("name")
        if got != name and (self.checking or isinstance(msg, str)):
            raise ConversionError(f'unexpected message: expected "{name}", got "{got}"')
        return msg

    def finish(self, msg: dict[str, Any]) -> None:
        """Every key of a message must have been consumed (popped) by the saver."""
        name = msg.pop("name", "?")
        if self.checking and msg:
            raise ConversionError(
                f"unexpected keys in message '{name}': {sorted(msg)} (use --no-checking to ignore)"
            )


def receive_end(reader: MessageReader) -> dict[str, Any] | None:
    """The end of the stream: the optional optimizer-state message (returned), then "done"."""
    end, extra = reader.get_raw(), None
    if isinstance(end, dict) and end.get("name") == OPTIMIZER_STATE:
        extra, end = end, reader.get_raw()
    if end != DONE:
        raise ConversionError(f"unsupported message '{end.get('name') if isinstance(end, dict) else end}'")
    return extra


def receive_metadata(reader: MessageReader) -> argparse.Namespace:
    """The first message: the metadata namespace (ours an argparse Namespace, upstream loaders' a
    types.SimpleNamespace), completed for upstream loaders' messages."""
    md = reader.get_raw()
    if isinstance(md, (str, dict)) or not hasattr(md, "__dict__"):
        raise ConversionError(f"the first message must be the metadata namespace, got {type(md).__name__}")
    return normalize_metadata(argparse.Namespace(**vars(md)))


# Upstream Megatron-LM savers (tools/checkpoint/saver_<name>.py), which hold only dense GPT/BERT models.
UPSTREAM_SAVERS = ("core", "mcore", "legacy")


def send_metadata(queue: Any, md: argparse.Namespace, args: argparse.Namespace) -> None:
    """Put the first message on the queue, in the form upstream savers accept as well as ours.

    A dense model's metadata carries no `num_experts` (upstream `saver_base.build_sys_argv` passes
    `--num-experts str(md.num_experts)`, and "None" or 0 both fail Megatron's argument checks) and
    `checkpoint_args.num_experts` None. Before upstream savers, a model they cannot hold is refused
    here, before anything is written, instead of failing half-way or exiting 0 having written nothing."""
    wire = argparse.Namespace(**vars(md))
    if not wire.num_experts:
        del wire.num_experts
    if getattr(wire, "checkpoint_args", None) is not None:
        wire.checkpoint_args = argparse.Namespace(**{**vars(wire.checkpoint_args), "num_experts": getattr(wire, "num_experts", None)})
    saver = getattr(args, "saver", None)
    if saver in UPSTREAM_SAVERS:
        refuse_for_upstream_saver(wire, saver)
    queue.put(wire)


def refuse_for_upstream_saver(md: argparse.Namespace, saver: str) -> None:
    """Upstream savers take dense GPT/BERT layers only (their schema has no key for the rest)."""
    features = [
        ("q/k layernorm (Qwen3-style)", getattr(md, "qk_layernorm", False)),
        ("multi-latent attention (MLA)", getattr(md, "multi_latent_attention", False)),
        ("MoE experts", getattr(md, "num_experts", None)),
        ("multi-token prediction (MTP)", getattr(md, "mtp_num_layers", 0)),
        ("LoRA adapter export", getattr(md, "lora_export", None)),
    ]
    found = [name for name, present in features if present]
    if found:
        raise ConversionError(f"upstream saver_{saver} cannot hold this model ({', '.join(found)}); "
                              f"use --saver core_ext, which writes the same Megatron-Core checkpoint")


def receive_experts(reader: MessageReader, message: str, md: argparse.Namespace) -> Iterator[tuple[int, dict[str, Any]]]:
    """The routed-expert messages following layer `message`: yields (first expert, checked message)
    until all `md.num_experts` experts have arrived, in order; the caller pops the stacked keys."""
    received = 0
    while received < md.num_experts:
        msg = reader.get(experts_message(message))
        first = take(msg, FIRST_EXPERT)
        count = msg[FC2_W].shape[0] if FC2_W in msg else 0
        if first != received or count < 1:
            raise ConversionError(f"{msg['name']}: expected experts from {received}, got {count} from {first}")
        check_shapes(msg, expert_shapes(md, count), msg["name"])
        yield first, msg
        received += count
        reader.finish(msg)


def take(msg: dict[str, Any], key: str) -> Any:
    """Pop a required key, naming the message when it is absent."""
    if key not in msg:
        raise ConversionError(f"message '{msg.get('name')}' lacks '{key}'")
    return msg.pop(key)


def layer_shapes(md: argparse.Namespace, layer: int = 0) -> dict[str, tuple[int, ...]]:
    """Expected shape of every key of a layer message the metadata implies (what savers check)."""
    h = md.hidden_size
    shapes = {INPUT_NORM_W: (h,), POST_NORM_W: (h,)}
    if md.norm_has_bias:
        shapes.update({INPUT_NORM_B: (h,), POST_NORM_B: (h,)})
    shapes.update(_mla_shapes(md) if getattr(md, "multi_latent_attention", False) else _attention_shapes(md))
    if is_moe_layer(md, layer):
        e, f = md.num_experts, md.moe_shared_expert_intermediate_size
        shapes[ROUTER_W] = (e, h)
        if getattr(md, "moe_router_enable_expert_bias", None) is not False:  # only an explicit False (Qwen3-MoE) drops it
            shapes[ROUTER_BIAS] = (e,)
        if f:  # MoE without shared experts (Qwen3-MoE) has none
            shapes.update({SHARED_FC1_GATE_W: (f, h), SHARED_FC1_UP_W: (f, h), SHARED_FC2_W: (h, f)})
        return shapes
    f = md.ffn_hidden_size
    shapes[FC2_W] = (h, f)
    if md.swiglu:
        shapes.update({FC1_GATE_W: (f, h), FC1_UP_W: (f, h)})
    else:
        shapes[FC1_W] = (f, h)
    if md.linear_bias:
        shapes[FC2_B] = (h,)
        shapes.update({FC1_GATE_B: (f,), FC1_UP_B: (f,)} if md.swiglu else {FC1_B: (f,)})
    return shapes


def _attention_shapes(md: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    h, kv = md.hidden_size, md.kv_channels
    qkv_rows = (md.num_attention_heads + 2 * md.num_query_groups) * kv
    shapes = {QKV_W: (qkv_rows, h), DENSE_W: (h, md.num_attention_heads * kv)}
    if md.qkv_bias:
        shapes[QKV_B] = (qkv_rows,)
    if getattr(md, "qk_layernorm", False):
        shapes.update({Q_NORM_W: (kv,), K_NORM_W: (kv,)})
    if md.linear_bias:
        shapes[DENSE_B] = (h,)
    return shapes


def _mla_shapes(md: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    h, heads, rope = md.hidden_size, md.num_attention_heads, md.qk_pos_emb_head_dim
    q_rows = heads * (md.qk_head_dim + rope)
    query = ({Q_DOWN_W: (md.q_lora_rank, h), Q_DOWN_NORM_W: (md.q_lora_rank,), Q_UP_W: (q_rows, md.q_lora_rank)}
             if md.q_lora_rank else {Q_W: (q_rows, h)})
    return {
        **query,
        KV_DOWN_W: (md.kv_lora_rank + rope, h), KV_DOWN_NORM_W: (md.kv_lora_rank,),
        KV_UP_W: (heads * (md.qk_head_dim + md.v_head_dim), md.kv_lora_rank), DENSE_W: (h, heads * md.v_head_dim),
    }


def expert_shapes(md: argparse.Namespace, count: int) -> dict[str, tuple[int, ...]]:
    h, f = md.hidden_size, md.moe_ffn_hidden_size
    return {FC1_GATE_W: (count, f, h), FC1_UP_W: (count, f, h), FC2_W: (count, h, f)}


def mtp_shapes(md: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    h = md.hidden_size
    extra = {MTP_ENORM_W: (h,), MTP_HNORM_W: (h,), MTP_EH_PROJ_W: (h, 2 * h), MTP_NORM_W: (h,)}
    return {**extra, **layer_shapes(md, md.num_layers)}


def check_shapes(msg: dict[str, Any], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected key present with its shape; raised before anything is written."""
    for key, shape in expected.items():
        if key not in msg:
            raise ConversionError(f"{where}: missing '{key}'")
        got = tuple(msg[key].shape)
        if got != shape:
            raise ConversionError(f"{where}: '{key}' has shape {list(got)}, expected {list(shape)}")


def global_shapes(md: argparse.Namespace, vocab_rows: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Expected shapes of the non-layer messages, for a vocabulary table of `vocab_rows` rows."""
    h = md.hidden_size
    norm = {"weight": (h,), **({"bias": (h,)} if md.norm_has_bias else {})}
    return {EMBEDDINGS: {WORD_EMB: (vocab_rows, h)}, FINAL_NORM: norm, OUTPUT_LAYER: {"weight": (vocab_rows, h)}}


def normalize_metadata(md: argparse.Namespace) -> argparse.Namespace:
    """Accept metadata from upstream loaders, which keep model options only in `checkpoint_args`."""
    ca = getattr(md, "checkpoint_args", None) or argparse.Namespace()
    if not hasattr(md, "num_experts") and getattr(ca, "num_experts", None):
        raise ConversionError("an upstream loader's MoE checkpoint (experts stacked in the layer messages) is not "
                              "supported by this saver; read it with --loader core_ext")
    heads = md.num_attention_heads
    defaults = {
        "ffn_hidden_size": getattr(ca, "ffn_hidden_size", None) or 4 * md.hidden_size,
        "num_query_groups": (getattr(ca, "num_query_groups", None) if getattr(ca, "group_query_attention", False) else None) or heads,
        "kv_channels": getattr(ca, "kv_channels", None) or md.hidden_size // heads,
        "normalization": getattr(ca, "normalization", "LayerNorm"),
        "norm_epsilon": getattr(ca, "norm_epsilon", 1e-5),
        "rotary_base": getattr(ca, "rotary_base", 10000),
        "qk_layernorm": bool(getattr(ca, "qk_layernorm", False)),
        "vocab_size": md.true_vocab_size,
        "hf_config": None,
        "rope_scaling": None,
        "rotary_percent": 1.0,
        "num_experts": None,
        "consumed_train_samples": 0,
        "consumed_valid_samples": 0,
    }
    for field, value in defaults.items():
        if not hasattr(md, field):
            setattr(md, field, value)
    if md.num_experts and getattr(md, "moe_router_enable_expert_bias", None) is None:
        md.moe_router_enable_expert_bias = True  # as layer_shapes: only an explicit False drops the bias
    return md


def _all_finite(t: torch.Tensor) -> bool:
    """min and max propagate NaN and show +-Inf: one vectorised pass, 60x faster than isfinite().all()."""
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(msg: dict[str, Any], strict: bool) -> None:
    """NaN/Inf in weights: one warning line per tensor, or an error with --strict."""
    for key, t in msg.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            text = f"message '{msg.get('name')}': '{key}' has {bad} NaN/Inf values"
            if strict:
                raise ConversionError(text + " (--strict)")
            print(f"warning: {text}", file=sys.stderr, flush=True)
