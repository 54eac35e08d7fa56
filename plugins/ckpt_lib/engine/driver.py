"""Checkpoint converter driver with the command line of Megatron-LM's tools/checkpoint/convert.py.

    python convert.py --model-type GPT --loader hf --saver core_ext --load-dir IN --save-dir OUT [plugin flags]

Plugins are modules `loader_<name>` / `saver_<name>` (falling back to `<name>`) found on the Python
path (the repository's `plugins/` first when run as `convert.py`; installed beside this package by
`pip install .`, whose `mcore-convert` is this driver); `mcore` means `core`. The saver runs in a child
process and the loader in this one, joined by a bounded queue, exactly as upstream. Unlike upstream:
a failing loader or saver ends the run with one `error:` line and a non-zero status (0 only when
both succeeded), a dead saver never leaves the loader blocked on a full queue, and `--help` after
`--loader X` / `--saver Y` lists their options too. `CKPT_DEBUG=1` prints tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import queue as queue_module
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import debug

EXIT, DONE = "exit", "done"
POLL_SECONDS = 0.5  # how long a put waits before looking at the saver again


def report(role: str, error: BaseException) -> None:
    """One `error:` line for an unexpected exception (plus its traceback under CKPT_DEBUG)."""
    if debug():
        traceback.print_exception(error)
    text = str(error)
    print(f"error: {role}: {type(error).__name__}{': ' + text if text else ''}", file=sys.stderr, flush=True)


def plugin_name(name: str) -> str:
    """Upstream's alias: `mcore` selects the `core` plugins."""
    return "core" if name == "mcore" else name


def _missing(error: ModuleNotFoundError, module_name: str) -> bool:
    """True when the plugin module itself is absent, not one of its imports."""
    return error.name is not None and (module_name == error.name or module_name.startswith(error.name + "."))


def _import(module_name: str, plugin_type: str) -> ModuleType | None:
    """Import a plugin candidate; None if it does not exist, one clear line if it is broken."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if _missing(e, module_name):
            return None
        if debug():
            traceback.print_exc()
        sys.exit(f"error: {plugin_type} plugin {module_name} cannot be imported: {e}")
    except Exception as e:  # a broken plugin: say which one and why, in one line
        if debug():
            traceback.print_exc()
        sys.exit(f"error: {plugin_type} plugin {module_name} cannot be imported: {type(e).__name__}: {e}")


def load_plugin(plugin_type: str, name: str) -> ModuleType:
    """Import `<type>_<name>`, else `<name>`; it must define add_arguments (upstream's rules)."""
    module_name = f"{plugin_type}_{name}"
    plugin = _import(module_name, plugin_type)
    if plugin is None:
        module_name = name
        plugin = _import(module_name, plugin_type)
    if plugin is None:
        sys.exit(f"error: unable to load {plugin_type} plugin {name} (no module {plugin_type}_{name} or {name})")
    if not hasattr(plugin, "add_arguments"):
        sys.exit(f"error: {module_name} module is not a plugin (no add_arguments)")
    print(f"Loaded {module_name} as the {plugin_type}.", flush=True)
    return plugin


class SaverDied(Exception):
    """The saver process ended before the loader finished."""


class SaverWatchingQueue:
    """The loader's side of the queue. Loaders call `put` directly, and a plain bounded queue would
    block them forever once the saver has died; this `put` gives up (SaverDied) instead. It also
    notes "done" and "exit" so the driver knows how the loader left the protocol."""

    def __init__(self, inner: Any, saver: Any) -> None:
        self.inner, self.saver = inner, saver
        self.saver_pid: int = saver.pid  # lets the loader use shared-memory buffers again (SharedPool)
        self.sent_done = self.sent_exit = False

    def _check_saver(self) -> None:
        if not self.saver.is_alive():
            raise SaverDied(f"the saver ended (exit status {self.saver.exitcode}) before the loader finished")

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._check_saver()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))
            try:
                if block:
                    self.inner.put(item, True, wait)
                else:
                    self.inner.put(item, False)
                break
            except queue_module.Full:
                self._check_saver()
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    raise
        if isinstance(item, str):
            self.sent_done |= item == DONE
            self.sent_exit |= item == EXIT

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __reduce__(self) -> tuple[Any, ...]:
        # A loader that hands its queue to a child process hands over the real queue.
        return (_identity, (self.inner,))


def _identity(value: Any) -> Any:
    return value


def run_saver(save_checkpoint: Callable[[Any, Any], Any], queue: Any, args: argparse.Namespace) -> None:
    """The saver process: an exception becomes one `error: saver:` line and exit status 1."""
    try:
        save_checkpoint(queue, args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        report("saver", e)
        sys.exit(1)


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
    parser.add_argument("--workers", type=workers_option, default="auto",
                        help="Worker processes, each converting its share of the output rank files (saver core_ext); "
                             "auto: one per two usable cores, at most one per target pipeline stage, 1 where shares "
                             "cannot be written; under torchrun every rank is one worker")
    return parser


def workers_option(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None


def auto_workers(saver: ModuleType, args: argparse.Namespace, world: int, cores: int | None = None) -> int:
    """`--workers auto`: a worker is a loader and a saver process, both busy, so one per two usable cores;
    at most one per target pipeline stage (more would read the same layers twice); 1 where the output
    cannot be shared (saver other than core_ext, torch_dist, torchrun, distributed-optimizer state to carry)."""
    if not getattr(saver, "SHARED_OUTPUT", False) or getattr(args, "ckpt_format", "torch") != "torch" or world > 1:
        return 1
    if carries_optimizer_state(args):
        return 1
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(cores // 2, getattr(args, "target_pipeline_parallel_size", None) or 1))


def carries_optimizer_state(args: argparse.Namespace) -> bool:
    """Whether a core_ext source's distributed-optimizer state will be carried (a single-process job)."""
    from .optimizer_state import OPTIM_FILE

    if not hasattr(args, "no_load_optim") or args.no_load_optim:
        return False
    return next(Path(args.load_dir).rglob(OPTIM_FILE), None) is not None


def help_request(argv: list[str]) -> tuple[bool, list[tuple[str, str]]]:
    """Whether help was asked for, and the plugins named explicitly, so that their options can be
    listed too (upstream shows only its own, because -h fires before the plugins are loaded)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--loader")
    pre.add_argument("--saver")
    try:
        ns, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:
        return False, []  # malformed; the real parser will say so
    named = [(kind, getattr(ns, kind)) for kind in ("loader", "saver") if getattr(ns, kind) is not None]
    return ns.help, named


def convert(loader: ModuleType, saver: ModuleType, args: argparse.Namespace) -> int:
    """Saver in a child process, loader here, as upstream; returns 0 only if both succeeded."""
    import torch.multiprocessing as mp

    queue = mp.Queue(maxsize=args.max_queue_size)
    print("Starting saver...", flush=True)
    saver_proc = mp.Process(target=run_saver, args=(saver.save_checkpoint, queue, args))
    saver_proc.start()
    watched = SaverWatchingQueue(queue, saver_proc)

    def stop_saver() -> None:
        """Tell a waiting saver the loader failed (once), unless it is already gone."""
        if not watched.sent_exit:
            try:
                watched.put(EXIT)
            except SaverDied:
                pass

    print("Starting loader...", flush=True)
    status, saver_died = 0, False
    try:
        try:
            loader.load_checkpoint(watched, args)
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        if watched.sent_exit:
            status = 1  # the loader gave up and has said why
        elif not watched.sent_done:
            print('error: loader: returned without sending "done"', file=sys.stderr, flush=True)
            status = 1
            stop_saver()
    except SaverDied:
        status, saver_died = 1, True  # the saver has said why, or its exit status does below
    except SystemExit as e:  # the loader has reported its own error (an int code) or gives it to us
        if isinstance(e.code, int):
            status = e.code if 1 <= e.code <= 255 else 1
        else:
            message = str(e.code)
            print(message if message.startswith("error:") else f"error: loader: {message}", file=sys.stderr, flush=True)
            status = 1
        stop_saver()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        saver_proc.terminate()
        status = 130
    except Exception as e:
        report("loader", e)
        stop_saver()
        status = 1
    print("Waiting for saver to complete...", flush=True)
    saver_proc.join()
    drain(queue)
    code = saver_proc.exitcode
    if code is not None and code < 0 and status != 130:
        print(f"error: saver: killed by {signal_name(-code)}", file=sys.stderr, flush=True)
    elif code == 0 and saver_died:
        print("error: saver: ended before the loader finished", file=sys.stderr, flush=True)
    if code:
        status = status or 1
    return status


def torchrun_world_size() -> int:
    """How many ranks torchrun started (1 when not run by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ else 1


def _worker(loader: ModuleType, saver: ModuleType, args: argparse.Namespace, share: Any) -> None:
    os.setpgid(0, 0)  # its own process group, so that stopping it stops its saver too
    sys.exit(convert(loader, saver, argparse.Namespace(**vars(args), share=share)))


def convert_shared(loader: ModuleType, saver: ModuleType, args: argparse.Namespace, world: int) -> int:
    """Several workers write their shares of the rank files into one staged directory, committed
    only when all succeeded: `--workers N` processes here, or each torchrun rank (`world` > 1)."""
    import multiprocessing
    from multiprocessing.connection import wait

    from ..errors import ConversionError
    from ..io.staging import StagedDir
    from ..transport import shares
    from ..transport.runtime import Summary

    if not getattr(saver, "SHARED_OUTPUT", False):
        raise ConversionError(f"--workers / torchrun need a saver that writes shares of its output (core_ext); {args.saver} does not")
    if args.workers > 1 and world > 1:
        raise ConversionError("--workers and torchrun cannot be combined: under torchrun every rank is one worker")
    if args.workers < 1:
        raise ConversionError(f"--workers must be >= 1, got {args.workers}")
    summary = Summary("convert")
    if world > 1:
        return _torchrun_worker(loader, saver, args, summary)
    staged = StagedDir(args.save_dir, args.overwrite)
    fork = multiprocessing.get_context("fork")  # plugin modules are handed over, not pickled
    workers = [fork.Process(target=_worker, args=(loader, saver, args, shares.Share(k, args.workers, staged.path)))
               for k in range(args.workers)]
    for worker in workers:
        worker.start()
    running = list(workers)
    try:
        while running:  # one failure stops the others: the output would be discarded anyway
            wait([w.sentinel for w in running])
            running = [w for w in running if w.exitcode is None]
            if any(w.exitcode for w in workers):
                _stop(running)
    except KeyboardInterrupt:
        _stop(running)
        staged.discard()
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    for worker in workers:
        worker.join()
    return shares.finish(staged, [w.exitcode for w in workers], summary)


def _stop(workers: list[Any]) -> None:
    """Stop workers with their savers (each worker leads its own process group)."""
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):  # not yet its own group leader
            worker.terminate()
    for worker in workers:
        worker.join()


def _torchrun_worker(loader: ModuleType, saver: ModuleType, args: argparse.Namespace, summary: Any) -> int:
    """One torchrun rank: rank 0 stages the output and commits it once every rank has reported success
    (torch.distributed over gloo; the staged directory must be on a file system all ranks share)."""
    import datetime

    import torch.distributed as dist

    from ..io.staging import StagedDir
    from ..transport import shares

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))  # a rank may convert for hours
    rank, world = dist.get_rank(), dist.get_world_size()
    staged, box = None, [None]
    try:
        if rank == 0:
            try:
                staged = StagedDir(args.save_dir, args.overwrite)
                box = [str(staged.path)]
            except Exception as e:
                report("convert", e)
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return 1
        status = convert(loader, saver, argparse.Namespace(**vars(args), share=shares.Share(rank, world, Path(box[0]))))
        statuses: list[Any] = [None] * world
        dist.all_gather_object(statuses, status)
        result = int(any(statuses))
        if staged is not None:
            try:
                result = shares.finish(staged, statuses, summary)
            except Exception as e:  # still reach the barrier, or the other ranks wait for a day
                report("convert", e)
                staged.discard()
                result = 1
        dist.barrier()  # every rank returns once the output is committed
        return result
    finally:
        dist.destroy_process_group()


def drain(queue: Any) -> None:
    """Read back what a dead saver left unread, so that the queue's feeder thread has flushed
    everything and ends before this process exits (one still blocked on the full pipe may abort
    the interpreter's shutdown); then never wait for it. Reading happens before `close()`: from
    then on get() is refused and the feeder closes the pipe on its way out."""
    feeder = getattr(queue, "_thread", None)
    deadline = time.monotonic() + 10
    while feeder is not None and feeder.is_alive() and time.monotonic() < deadline:
        try:
            queue.get(timeout=0.05)
        except queue_module.Empty:
            if not getattr(queue, "_buffer", None):
                break  # nothing buffered, nothing in the pipe: the feeder is idle
    queue.close()
    if feeder is not None:
        feeder.join(max(0.0, min(1.0, deadline - time.monotonic())))
    queue.cancel_join_thread()


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    wants_help, named = help_request(argv)
    if wants_help:
        for kind, name in named:
            load_plugin(kind, plugin_name(name)).add_arguments(parser)
        parser.print_help()
        return 0
    known, _ = parser.parse_known_args(argv)
    loader = load_plugin("loader", plugin_name(known.loader))
    saver = load_plugin("saver", plugin_name(known.saver))
    loader.add_arguments(parser)
    saver.add_arguments(parser)
    args = parser.parse_args(argv)
    world = torchrun_world_size()
    if args.workers == "auto":
        args.workers = auto_workers(saver, args, world)
    status = convert_shared(loader, saver, args, world) if args.workers != 1 or world > 1 else convert(loader, saver, args)
    if status == 0 and args.verify:
        status = run_verify(plugin_name(known.loader), args)
    return status


def run_verify(loader: str, args: argparse.Namespace) -> int:
    """Re-read the input with the same loader options and the output with its own loader."""
    from . import verify

    options = argparse.Namespace(source=Path(args.load_dir), converted=Path(args.save_dir), source_loader=loader,
                                 converted_loader=None, source_args="", converted_args="", atol=0.0)
    print("Verifying...", flush=True)
    return 0 if verify.run(options, source_args=args) else 1


def cli() -> int:
    """main() with anything unexpected (a plugin's add_arguments failing, say) as one line."""
    try:
        return main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        report("convert", e)
        return 1
