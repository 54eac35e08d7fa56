"""One exception type for every user-facing failure, so drivers can print one clear line."""

import os


class ConversionError(Exception):
    """Bad input, bad options or an inconsistent checkpoint; the message names the culprit."""


def debug() -> bool:
    """Tracebacks and internals only on request: `CKPT_DEBUG=1` (unset, empty or 0: off)."""
    return os.environ.get("CKPT_DEBUG", "") not in ("", "0")
