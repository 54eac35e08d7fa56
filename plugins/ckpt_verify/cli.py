"""`verify.py` / `mcore-verify`: compare every weight of two checkpoints after undoing their sharding,
and with --logits run both sides (transformers, megatron-core on CPU) and compare their logits.

    python verify.py --source ./Qwen3-8B --converted ./qwen3-mcore [--atol 0] [--logits]

Exit status 0 when every tensor (and the logits) agree within tolerance, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ckpt_lib.engine import verify
from ckpt_lib.errors import ConversionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verify.add_arguments(parser)
    parser.add_argument("--logits", action="store_true",
                        help="Also run both sides (transformers for the HF side, megatron-core on CPU for the Megatron side) "
                             "on random token sequences and compare logits (small models; needs megatron-core and transformers)")
    parser.add_argument("--logits-atol", type=float, default=1e-4, help="Largest accepted logits difference (fp32)")


def compare_logits(hf_dir: Path, mcore_dir: Path, atol: float, report: Any = print) -> bool:
    """transformers on the HF side, megatron-core (one CPU process per rank) on the Megatron side."""
    from transformers import AutoModelForCausalLM

    from ckpt_verify.mcore_runner import mcore_logits

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).logits.float()
    ours = mcore_logits(mcore_dir, tokens)[..., :vocab]
    diff = (ours - reference).abs()
    top1 = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    ok = diff.max().item() <= atol
    report(f"{'PASS' if ok else 'FAIL'} logits: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
           f"top-1 agreement {top1:.1%} (tolerance {atol:g}, fp32, 2 x 16 tokens)")
    return ok


def run(args: argparse.Namespace) -> bool:
    """The weights (and manifest) first, then the logits when asked."""
    ok = verify.run(args)
    if args.logits:
        sides = {verify.detect_loader(d): d for d in (args.source, args.converted)}
        hf_dir = sides.get("hf") or sides.get("hf_deepseek3")
        if hf_dir is None or "core_ext" not in sides:
            raise ConversionError("--logits compares an HF directory with a Megatron checkpoint")
        ok = compare_logits(hf_dir, sides["core_ext"], args.logits_atol) and ok
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    try:
        return 0 if run(args) else 1
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
