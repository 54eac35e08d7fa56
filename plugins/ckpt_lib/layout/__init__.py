"""Pure layout rules (no I/O, no models): pipeline stages, tensor-parallel splits."""
