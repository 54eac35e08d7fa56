"""Checkpoint converter driver with the command line of Megatron-LM's tools/checkpoint/convert.py.

    python convert.py --model-type GPT --loader hf --saver core_ext --load-dir IN --save-dir OUT [plugin flags]

Plugins are modules `loader_<name>` / `saver_<name>` (falling back to `<name>`) found in this
repository's `plugins/` or on the Python path. The saver runs in a child process and the loader in
this one, joined by a bounded queue, exactly as upstream. Unlike upstream, a failing loader or saver
ends the run with one `error:` line and a non-zero status, and a dead saver never leaves the loader
blocked on a full queue. `CKPT_DEBUG=1` prints tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import queue as queue_module
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

PLUGINS = Path(__file__).resolve().parent / "plugins"
if PLUGINS.is_dir() and str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))


def load_plugin(plugin_type: str, name: str) -> ModuleType:
    """Import `<type>_<name>`, else `<name>`; it must define add_arguments (upstream's rule)."""
    module_name = f"{plugin_type}_{name}"
    try:
        plugin = importlib.import_module(module_name)
    except ModuleNotFoundError as first:
        if first.name != module_name:
            raise
        module_name = name
        try:
            plugin = importlib.import_module(module_name)
        except ModuleNotFoundError as second:
            if second.name != module_name:
                raise
            sys.exit(f"error: unable to load {plugin_type} plugin {name} (no module {plugin_type}_{name} or {name})")
    if not hasattr(plugin, "add_arguments"):
        sys.exit(f"error: {module_name} module is not a plugin (no add_arguments)")
    print(f"Loaded {module_name} as the {plugin_type}.", flush=True)
    return plugin


class SaverWatchingQueue:
    """The loader's side of the queue: `put` gives up when the saver process has died, so a saver
    that fails early can never leave the loader blocked on a full queue."""

    def __init__(self, inner: Any, saver: Any) -> None:
        self.inner, self.saver = inner, saver

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        while True:
            try:
                return self.inner.put(item, timeout=0.5)
            except queue_module.Full:
                if not self.saver.is_alive():
                    raise SaverDied() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class SaverDied(Exception):
    """The saver process ended before the loader finished."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Megatron Checkpoint Converter Arguments",
                                     allow_abbrev=False, conflict_handler="resolve")
    parser.add_argument("--model-type", type=str, required=True, choices=["GPT", "BERT"], help="Type of the model")
    parser.add_argument("--loader", type=str, default="megatron", help="Module name to load checkpoint, should be on python path")
    parser.add_argument("--saver", type=str, default="megatron", help="Module name to save checkpoint, should be on python path")
    parser.add_argument("--load-dir", type=str, required=True, help="Directory to load model checkpoint from")
    parser.add_argument("--save-dir", type=str, required=True, help="Directory to save model checkpoint to")
    parser.add_argument("--max-queue-size", type=int, default=50, help="Maximum number of tensors in the queue")
    parser.add_argument("--no-checking", action="store_false", dest="checking",
                        help="Do not perform checking on the name and ordering of weights")
    parser.add_argument("--verify", action="store_true",
                        help="After converting, compare every weight of the output with the input (see verify.py)")
    return parser


def main() -> int:
    import torch.multiprocessing as mp

    parser = build_parser()
    if {"-h", "--help"} & set(sys.argv[1:]) and not {"--loader", "--saver"} & set(sys.argv[1:]):
        parser.print_help()
        return 0
    known, _ = parser.parse_known_args()
    names = {key: "core" if getattr(known, key) == "mcore" else getattr(known, key) for key in ("loader", "saver")}
    loader = load_plugin("loader", names["loader"])
    saver = load_plugin("saver", names["saver"])
    loader.add_arguments(parser)
    saver.add_arguments(parser)
    args = parser.parse_args()

    queue = mp.Queue(maxsize=args.max_queue_size)
    print("Starting saver...", flush=True)
    saver_proc = mp.Process(target=saver.save_checkpoint, args=(queue, args))
    saver_proc.start()
    print("Starting loader...", flush=True)
    status = 0
    watched = SaverWatchingQueue(queue, saver_proc)

    def stop_saver() -> None:
        try:
            watched.put("exit")
        except SaverDied:
            pass

    try:
        loader.load_checkpoint(watched, args)
    except SaverDied:
        status = 1  # the saver has printed its own error
    except SystemExit as e:  # our loaders report their own error, then exit non-zero
        status = e.code if isinstance(e.code, int) else 1
        if status:
            stop_saver()
    except BaseException as e:  # an unexpected loader failure: tell the saver, say it in one line
        if os.environ.get("CKPT_DEBUG"):
            traceback.print_exc()
        print(f"error: loader: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        stop_saver()
        status = 1
    print("Waiting for saver to complete...", flush=True)
    saver_proc.join()
    if saver_proc.exitcode:
        status = status or 1
    if status == 0 and args.verify:
        status = run_verify(names["loader"], args)
    return status


def run_verify(loader: str, args: argparse.Namespace) -> int:
    """Re-read the input with the same loader options and the output with its own loader."""
    from ckpt_lib import verify

    options = argparse.Namespace(source=Path(args.load_dir), converted=Path(args.save_dir), source_loader=loader,
                                 converted_loader=None, source_args="", converted_args="", atol=0.0)
    print("Verifying...", flush=True)
    return 0 if verify.run(options, source_args=args) else 1


if __name__ == "__main__":
    sys.exit(main())
