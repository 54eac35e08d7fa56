"""One exception type for every user-facing failure, so drivers can print one clear line."""


class ConversionError(Exception):
    """Bad input, bad options or an inconsistent checkpoint; the message names the culprit."""
