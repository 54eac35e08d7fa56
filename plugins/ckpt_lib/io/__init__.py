"""File formats: safetensors, Megatron rank files, torch_dist, staging, manifests, FP8 and NF4 packing."""
