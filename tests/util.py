"""Shared test helpers: tiny transformers models, running conversions, reading outputs back."""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"  # importable as installed by `make env` (pip install -e .)

FAMILIES: dict[str, dict[str, Any]] = {
    # Llama with GQA (4 heads, 2 groups), untied.
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", extra={}),
    # Qwen2: q/k/v bias, tied embeddings.
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", extra={"tie_word_embeddings": True}),
    # Qwen3: q/k RMSNorm, head_dim != hidden/heads.
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", extra={"head_dim": 24}),
}


def missing_here(why: str) -> None:
    """Something a test needs is not installed: a skip on a developer's machine, a failure under CI
    (which runs `make env` and has ../shared)."""
    import pytest

    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(why)
    pytest.skip(why)


def make_hf_model(family: str, directory: Path, num_layers: int = 4, dtype: torch.dtype = torch.float32,
                  seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Build a tiny random model with transformers and save_pretrained it (no hub access)."""
    import transformers

    spec = FAMILIES[family]
    torch.manual_seed(seed)
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=num_layers, vocab_size=100, max_position_embeddings=128, rms_norm_eps=1e-6)
    cfg = getattr(transformers, spec["cfg"])(**{**base, **spec["extra"], **overrides})
    model = getattr(transformers, spec["cls"])(cfg).to(dtype).eval()
    with torch.no_grad():  # random norms, so a swapped norm would show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def convert_inprocess(loader: str, saver: str, load_dir: Path, save_dir: Path, *extra: str) -> None:
    """Run a loader and a saver through a thread queue (fast; same code as the driver runs)."""
    import importlib

    lmod, smod = importlib.import_module(f"loader_{loader}"), importlib.import_module(f"saver_{saver}")
    parser = argparse.ArgumentParser(conflict_handler="resolve", allow_abbrev=False)
    parser.add_argument("--load-dir")
    parser.add_argument("--save-dir")
    parser.add_argument("--no-checking", action="store_false", dest="checking")
    lmod.add_arguments(parser)
    smod.add_arguments(parser)
    args = parser.parse_args(["--load-dir", str(load_dir), "--save-dir", str(save_dir), *extra])
    q: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []

    def run_saver() -> None:
        try:
            smod.save_checkpoint(q, args)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            failure.append(e)

    thread = threading.Thread(target=run_saver)

    class Guarded:
        """The loader's queue; stops blocking when the saver thread has died. Like the driver's, it names
        the saver's process (this one) so that the loader uses its shared-memory buffers again."""

        saver_pid = os.getpid()

        def qsize(self) -> int:
            return q.qsize()

        def put(self, item: Any) -> None:
            while True:
                try:
                    return q.put(item, timeout=0.2)
                except queue.Full:
                    if not thread.is_alive():
                        raise failure[0] if failure else RuntimeError("saver ended early") from None

    thread.start()
    try:
        lmod.load_checkpoint(Guarded(), args)
    finally:
        thread.join()
    if failure:
        raise failure[0]


def convert_cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the root convert.py as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), "--model-type", "GPT", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def read_mcore_dir(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{rank dir/chunk: state dict} of a legacy checkpoint, for exact comparisons."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(Path(directory).glob("*/mp_rank_*/model_optim_rng.pt")):
        ckpt = torch.load(f, map_location="cpu", weights_only=False)
        for key in sorted(k for k in ckpt if k.startswith("model")):
            out[f"{f.parent.name}/{key}"] = ckpt[key]
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


DEEPSEEK_CONFIG = dict(
    vocab_size=100, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
    num_experts_per_tok=4, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def assert_same_conversion(first: Path, second: Path, out: Path, *flags: str) -> dict[str, dict[str, torch.Tensor]]:
    """Two HF checkpoints of the same weights (e.g. per-expert and fused experts on disk) converted to core_ext
    with `flags` (into out/a and out/b) give the same rank files; returns the first's, read back."""
    convert_inprocess("hf", "core_ext", first, out / "a", *flags)
    convert_inprocess("hf", "core_ext", second, out / "b", *flags)
    a, b = read_mcore_dir(out / "a"), read_mcore_dir(out / "b")
    assert sorted(a) == sorted(b)
    for k in a:
        assert_same_tensors(a[k], b[k])
    return a


def make_deepseek_model(directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny DeepSeek-V3 (MLA, first layer dense, 8 routed experts + 1 shared, sigmoid routing with
    expert bias) saved with transformers, plus an MTP layer written into the safetensors as the
    official checkpoint does (layer index num_hidden_layers, with embed_tokens / shared_head copies).
    Returns (model, mtp_state)."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**DEEPSEEK_CONFIG, **overrides})
    model = DeepseekV3ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts))
    model.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    mtp: dict[str, torch.Tensor] = {}
    if cfg.num_nextn_predict_layers:
        h, L = cfg.hidden_size, cfg.num_hidden_layers
        gen = torch.Generator().manual_seed(seed + 1)
        last = f"model.layers.{L - 1}."
        for name, t in tensors.items():  # a full MoE decoder layer, re-randomised
            if name.startswith(last):
                mtp[name[len(last):]] = (t.float() + 0.02 * torch.randn(t.shape, generator=gen)).to(t.dtype)
        mtp.update({
            "enorm.weight": 1 + 0.1 * torch.randn(h, generator=gen), "hnorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
            "eh_proj.weight": 0.05 * torch.randn(h, 2 * h, generator=gen),
            "shared_head.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
            "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
            "shared_head.head.weight": tensors["lm_head.weight"].clone(),
        })
        mtp = {k: v.to(dtype) if k != "mlp.gate.e_score_correction_bias" else v for k, v in mtp.items()}
        tensors.update({f"model.layers.{L}.{k}": v.contiguous() for k, v in mtp.items()})
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return model, mtp


# DeepSeek-V3 target layouts (saver_core_ext flags); noop layers and dualpipev are MindSpeed-LLM layouts.
DEEPSEEK_LAYOUTS = {
    "tp2": ["--target-tensor-parallel-size", "2"],
    "ep2": ["--target-expert-parallel-size", "2"],
    "pp2": ["--target-pipeline-parallel-size", "2"],
    "tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "tp2pp2ep2": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "vpp": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "uneven": ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"],
    "noop": ["--target-pipeline-parallel-size", "2", "--noop-layers", "4,5", "--num-layers", "6"],
    "dualpipev": ["--target-pipeline-parallel-size", "2", "--schedules-method", "dualpipev"],
}


def fuse_experts(src: Path, dst: Path) -> None:
    """The same HF checkpoint with transformers' in-memory expert layout on disk: per MoE layer (MTP layers included)
    gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I] in place of the per-expert matrices."""
    import re
    import shutil

    from safetensors.torch import save_file

    tensors = read_safetensors_dir(src)
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    found = (re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.gate_proj\.weight", k) for k in tensors)
    counts: dict[str, int] = {}
    for m in filter(None, found):
        counts[m[1]] = max(counts.get(m[1], 0), int(m[2]) + 1)
    for p, count in counts.items():
        experts = range(count)
        out[p + "gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}{e}.gate_proj.weight"], tensors[f"{p}{e}.up_proj.weight"]])
                                               for e in experts])
        out[p + "down_proj"] = torch.stack([tensors[f"{p}{e}.down_proj.weight"] for e in experts])
    dst.mkdir()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")


# More layouts an MoE family's HF -> mcore -> HF round trip is checked at: TE names, grouped experts, torch_dist, uneven PP.
MOE_ROUND_TRIPS = {
    "te_tp2ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "te_grouped_gemm": ["--moe-grouped-gemm", "--target-expert-parallel-size", "2"],
    "torch_dist": ["--ckpt-format", "torch_dist", "--target-expert-parallel-size", "2"],
    "uneven_pp": ["--saver-transformer-impl", "local", "--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"],
}
