"""Checkpoint converter with the command line of Megatron-LM's tools/checkpoint/convert.py.

    python convert.py --model-type GPT --loader hf --saver core_ext --load-dir IN --save-dir OUT [plugin flags]

The driver is `ckpt_lib.engine.driver` (also installed as `mcore-convert` by `pip install .`). This entry
script puts the repository's plugins/ first on the path, so `--loader hf` is plugins/loader_hf.py
whatever else is installed; in a Megatron-LM checkout, where plugins/ does not exist, the script's
own directory (tools/checkpoint, holding what install.py copied) is already on the path.
"""

import sys
from pathlib import Path

PLUGINS = Path(__file__).resolve().parent / "plugins"
if PLUGINS.is_dir():
    while str(PLUGINS) in sys.path:
        sys.path.remove(str(PLUGINS))
    sys.path.insert(0, str(PLUGINS))

from ckpt_lib.engine.driver import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
