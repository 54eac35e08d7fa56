"""HuggingFace dense GPT (Llama, Mistral, Qwen2, Qwen3) loader: config.json + safetensors -> protocol.

A plugin for Megatron-LM's tools/checkpoint/convert.py (and this project's convert.py).
"""

from ckpt_lib.engine import hf_loader
from ckpt_lib.transport.runtime import run_loader


def add_arguments(parser):
    hf_loader.add_arguments(parser.add_argument_group(title="loader_hf"))


def load_checkpoint(queue, args):
    run_loader(hf_loader.load, queue, args)
