"""HuggingFace DeepSeek-V3 loader (MLA, MoE, MTP) -> protocol, layer by layer from the index.

A plugin for Megatron-LM's tools/checkpoint/convert.py (and this project's convert.py).
"""

from ckpt_lib.engine import hf_deepseek_loader
from ckpt_lib.transport.runtime import run_loader


def add_arguments(parser):
    hf_deepseek_loader.add_arguments(parser.add_argument_group(title="loader_hf_deepseek3"))


def load_checkpoint(queue, args):
    run_loader(hf_deepseek_loader.load, queue, args)
