"""HuggingFace saver: sharded safetensors + config.json, dtype preserved.

A plugin for Megatron-LM's tools/checkpoint/convert.py (and this project's convert.py).
"""

from ckpt_lib.engine import hf_saver
from ckpt_lib.transport.runtime import run_saver


def add_arguments(parser):
    hf_saver.add_arguments(parser.add_argument_group(title="saver_hf"))


def save_checkpoint(queue, args):
    run_saver(hf_saver.save, queue, args)
