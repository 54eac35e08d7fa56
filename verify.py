"""Verify a conversion: compare every weight of two checkpoints after undoing their sharding.

    python verify.py --source ./Qwen3-8B --converted ./qwen3-mcore [--atol 0]

The tool is `ckpt_verify.cli` (also installed as `mcore-verify` by `pip install .`); this entry
script puts the repository's plugins/ on the path first. Exit status 0 when every tensor agrees
within --atol (default: bit-exact), 1 otherwise.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "plugins"))

from ckpt_verify.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
