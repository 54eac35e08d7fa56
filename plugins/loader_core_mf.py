"""MindSpore Transformers safetensors loader (seed 002's `core_mf`), streaming and layout-correct.

A plugin for Megatron-LM's tools/checkpoint/convert.py (and this project's convert.py).
"""

from ckpt_lib.engine import ms_loader
from ckpt_lib.transport.runtime import run_loader


def add_arguments(parser):
    ms_loader.add_arguments(parser.add_argument_group(title="loader_core_mf"))


def load_checkpoint(queue, args):
    run_loader(ms_loader.load, queue, args)
