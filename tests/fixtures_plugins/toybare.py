"""A plugin found by its bare name (`--saver toybare`, no saver_toybare module)."""

from saver_toy import add_arguments, save_checkpoint  # noqa: F401 - re-exported as this plugin
