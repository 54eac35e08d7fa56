"""Shared library of the checkpoint plugin pack.

The plugin modules (`loader_*.py`, `saver_*.py`) stay thin: they declare flags and wire a reader,
a family table and a writer together. Everything that is easy to get wrong lives here, one module
per concern: `pipeline` and `sharding` (pure layout rules), `protocol` (queue messages),
`families` (name/layout tables between formats), `safetensors_io` / `megatron_io` (files),
`staging` (atomic output directories).
"""

__version__ = "0.1.0"
