"""Toy stand-in for upstream's loader_core, to check that `--loader mcore` selects it."""

from loader_toy import add_arguments, load_checkpoint  # noqa: F401 - re-exported as this plugin
