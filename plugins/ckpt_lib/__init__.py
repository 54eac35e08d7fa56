"""Shared library of the checkpoint plugin pack.

The plugin modules (`loader_*.py`, `saver_*.py`) stay thin: they declare flags and call the engine.
The library is five layers, each importing only itself and those before it: `layout` (pure pipeline
and tensor-parallel rules), `io` (file formats: safetensors, Megatron rank files, torch_dist,
staging, manifests), `transport` (the queue protocol), `families` (name and config tables between
formats, Megatron's included) and `engine` (loaders, savers, the rank-file plan, writers, verify).
"""

__version__ = "0.1.0"
