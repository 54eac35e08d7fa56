"""Megatron-Core legacy torch checkpoint loader, any TP/PP/VPP layout, detected from the files.

A plugin for Megatron-LM's tools/checkpoint/convert.py (and this project's convert.py).
"""

from ckpt_lib.engine import mcore_loader
from ckpt_lib.transport.runtime import run_loader


def add_arguments(parser):
    mcore_loader.add_arguments(parser.add_argument_group(title="loader_core_ext"))


def load_checkpoint(queue, args):
    run_loader(mcore_loader.load, queue, args)
