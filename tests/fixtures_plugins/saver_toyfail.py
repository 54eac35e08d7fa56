"""Toy saver that fails after the metadata: --toyfail-mode exit (silent status 1), raise or kill."""

import os
import signal
import sys


def add_arguments(parser):
    parser.add_argument("--toyfail-mode", choices=["exit", "raise", "kill"], default="exit")


def save_checkpoint(queue, args):
    queue.get()
    if args.toyfail_mode == "raise":
        raise ValueError("toy saver cannot write here")
    if args.toyfail_mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(1)
