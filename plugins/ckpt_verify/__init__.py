"""Verification of conversions by running real megatron-core models on CPU (not shipped into Megatron-LM checkouts)."""
