"""Compare two checkpoints of any supported formats by their protocol streams (`convert.py --verify`,
and the weights part of `verify.py` / `mcore-verify`, whose command line is `ckpt_verify.cli`).

Each side is read by its loader, exactly as a conversion would (so sharding is undone the same way),
and the two message streams are compared key by key: missing or extra messages and keys, shapes,
dtypes and the max abs difference of every tensor. Vocabulary tables are compared on the real
vocabulary (padding rows excluded). Memory stays at about one layer per side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import queue
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..families.deepseek import V2_MODEL_TYPES, V3_MODEL_TYPES
from ..io import manifest
from ..transport import protocol as P

VOCAB_KEYS = {(P.EMBEDDINGS, P.WORD_EMB), (P.OUTPUT_LAYER, "weight")}


def detect_loader(directory: Path) -> str:
    """Which loader reads a directory: HF (dense, or the MLA family: DeepSeek-V3, Kimi-K2, DeepSeek-V2), or Megatron legacy torch."""
    if (directory / "latest_checkpointed_iteration.txt").exists() or any(directory.glob("iter_*")) or (directory / "release").exists():
        return "core_ext"
    config = directory / "config.json"
    if config.exists():
        mla = json.loads(config.read_text()).get("model_type") in (*V3_MODEL_TYPES, *V2_MODEL_TYPES)
        return "hf_deepseek3" if mla else "hf"
    if any(directory.glob("*.safetensors")):
        return "core_mf"
    raise ConversionError(f"{directory}: cannot tell the checkpoint format (no config.json, tracker file or safetensors)")


class Stream:
    """A loader running in a thread, its messages available one at a time."""

    def __init__(self, loader: str, directory: Path, extra: list[str], args: argparse.Namespace | None = None,
                 **overrides: Any) -> None:
        module = importlib.import_module(f"loader_{loader}")
        if args is None:
            parser = argparse.ArgumentParser(conflict_handler="resolve", allow_abbrev=False)
            parser.add_argument("--load-dir")
            module.add_arguments(parser)
            args = parser.parse_args(["--load-dir", str(directory), *extra])
        self.args = argparse.Namespace(**{**overrides, **vars(args), "load_dir": str(directory), "save_dir": None,
                                          "checking": True, "no_load_optim": True})  # weights, not optimizer state
        self.first: Any = None
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(module,), daemon=True)
        self.thread.start()

    def _run(self, module: Any) -> None:
        try:
            module.load_checkpoint(self.queue, self.args)
        except BaseException as e:  # noqa: BLE001 - surfaced by get()
            self.error.append(e)
            self.queue.put(P.EXIT)

    def peek(self) -> Any:
        """The first message (the metadata), left to be returned by `get` again."""
        if self.first is None:
            self.first = self._get()
        return self.first

    def get(self) -> Any:
        first, self.first = self.first, None
        return first if first is not None else self._get()

    def _get(self) -> Any:
        msg = self.queue.get()
        if isinstance(msg, str) and msg == P.EXIT:
            raise ConversionError(f"reading {self.args.load_dir} failed" + (f": {self.error[0]}" if self.error else ""))
        return msg


def compare(source: Stream, converted: Stream, atol: float, report: Any = print) -> bool:
    """Walk both streams; print one line per difference and a summary. True when they agree."""
    md_a, md_b = source.get(), converted.get()
    rows = P.spec_from_message(md_a).true_vocab_size or P.spec_from_message(md_b).true_vocab_size
    ok, tensors, worst = True, 0, 0.0
    while True:
        a, b = source.get(), converted.get()
        if isinstance(a, str) or isinstance(b, str):
            if a != b:
                report(f"FAIL stream ends differ: {a if isinstance(a, str) else a['name']!r} vs {b if isinstance(b, str) else b['name']!r}")
                ok = False
            break
        name = a["name"]
        if b["name"] != name:
            report(f"FAIL message order: {name!r} vs {b['name']!r}")
            return False
        for key in sorted(set(a) | set(b)):
            if key == "name":
                continue
            if key not in a or key not in b:
                report(f"FAIL {name} / {key}: only in the {'source' if key in a else 'converted'} checkpoint")
                ok = False
                continue
            x, y = a[key], b[key]
            if not isinstance(x, torch.Tensor):
                if x != y:
                    report(f"FAIL {name} / {key}: {x!r} vs {y!r}")
                    ok = False
                continue
            if (name, key) in VOCAB_KEYS and rows:
                x, y = x[:rows], y[:rows]
            tensors += 1
            if x.shape != y.shape:
                report(f"FAIL {name} / {key}: shape {list(x.shape)} vs {list(y.shape)}")
                ok = False
                continue
            dtype_note = "" if x.dtype == y.dtype else f" (dtype {x.dtype} vs {y.dtype}; source rounded to {y.dtype})"
            if x.dtype != y.dtype and x.is_floating_point() and y.is_floating_point():
                x = x.to(y.dtype)  # a conversion's --params-dtype rounds once; compare against that
            diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            worst = max(worst, diff)
            if diff > atol:
                report(f"FAIL {name} / {key}: max abs diff {diff:.3e}{dtype_note}")
                ok = False
            elif dtype_note and tensors == 1:
                report(f"note: dtypes differ{dtype_note}")
    report(f"{'PASS' if ok else 'FAIL'}: {tensors} tensors compared, max abs diff {worst:.3e} (tolerance {atol:g})")
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", type=Path, required=True, help="The original checkpoint directory")
    parser.add_argument("--converted", type=Path, required=True, help="The converted checkpoint directory")
    parser.add_argument("--source-loader", default=None, help="Loader for --source (default: detected)")
    parser.add_argument("--converted-loader", default=None, help="Loader for --converted (default: detected)")
    parser.add_argument("--source-args", default="", help="Extra loader flags for --source, e.g. '--mtp-num-layers 1'")
    parser.add_argument("--converted-args", default="", help="Extra loader flags for --converted")
    parser.add_argument("--atol", type=float, default=0.0, help="Largest accepted abs difference (default 0: bit-exact)")


def check_manifest(directory: Path, report: Any = print) -> bool:
    """Re-check the converted directory's manifest: every file present with its checksum."""
    if not (directory / manifest.NAME).exists():
        report(f"note: {directory} has no {manifest.NAME}; checksums not checked")
        return True
    problems = manifest.check(directory)
    for problem in problems:
        report(f"FAIL manifest: {problem}")
    if not problems:
        report(f"manifest: {directory / manifest.NAME} agrees with every file")
    return not problems


def run(args: argparse.Namespace, source_args: argparse.Namespace | None = None) -> bool:
    """Manifest check, then the stream comparison. `source_args` reuses a conversion's own
    parsed loader options for the source side (convert.py --verify)."""
    manifest_ok = check_manifest(args.converted)
    converted = Stream(args.converted_loader or detect_loader(args.converted), args.converted, args.converted_args.split())
    source_loader = args.source_loader or detect_loader(args.source)
    overrides = {}
    if source_loader == "hf_deepseek3" and source_args is None:
        # An FP8 source is dequantized to the dtype the conversion wrote (its --params-dtype), as it was then.
        overrides["params_dtype"] = P.DTYPE_NAMES.get(getattr(converted.peek(), "params_dtype", None))
    source = Stream(source_loader, args.source, args.source_args.split(), source_args, **overrides)
    ok = compare(source, converted, args.atol) and manifest_ok
    for stream in (source, converted):  # drain so both loader threads finish before exit
        while stream.thread.is_alive():
            try:
                stream.queue.get(timeout=0.1)
            except queue.Empty:
                pass
    return ok

