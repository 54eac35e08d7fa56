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
PLUGINS = ROOT / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))

FAMILIES: dict[str, dict[str, Any]] = {
    # Llama with GQA (4 heads, 2 groups), untied.
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", extra={}),
    # Qwen2: q/k/v bias, tied embeddings.
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", extra={"tie_word_embeddings": True}),
    # Qwen3: q/k RMSNorm, head_dim != hidden/heads.
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", extra={"head_dim": 24}),
}


def make_hf_model(family: str, directory: Path, num_layers: int = 4, dtype: torch.dtype = torch.float32,
                  seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Build a tiny random model with transformers and save_pretrained it (no hub access)."""
    import transformers

    spec = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, spec["cfg"])(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=num_layers, vocab_size=100, max_position_embeddings=128, rms_norm_eps=1e-6,
        **{**spec["extra"], **overrides},
    )
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
    thread.start()
    lmod.load_checkpoint(q, args)
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
