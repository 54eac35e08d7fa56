"""Megatron-Core saver for any TP/PP/VPP/uneven layout (legacy torch format), streaming per pipeline stage.

A plugin for Megatron-LM's tools/checkpoint/convert.py (and this project's convert.py).
"""

from ckpt_lib.engine import mcore_saver
from ckpt_lib.transport.runtime import run_saver


def add_arguments(parser):
    mcore_saver.add_arguments(parser.add_argument_group(title="saver_core_ext"))


def save_checkpoint(queue, args):
    run_saver(mcore_saver.save, queue, args)


# Under `convert.py --workers N` or torchrun, each worker writes its share of the rank files.
SHARED_OUTPUT = True
