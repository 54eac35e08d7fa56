"""The tests' name for the megatron-core CPU runner, which verify.py --logits uses too."""

from ckpt_verify.mcore_runner import mcore_logits, mcore_outputs, read_args

__all__ = ["mcore_logits", "mcore_outputs", "read_args"]
