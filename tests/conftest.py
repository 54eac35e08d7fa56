"""Make the plugins and their library importable as Megatron-LM's tools/checkpoint would."""

import sys
from pathlib import Path

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")
if PLUGINS not in sys.path:
    sys.path.insert(0, PLUGINS)
