"""Verify a conversion: compare every weight of two checkpoints after undoing their sharding.

    python verify.py --source ./Qwen3-8B --converted ./qwen3-mcore [--atol 0]

Exit status 0 when every tensor agrees within --atol (default: bit-exact), 1 otherwise.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "plugins"))

from ckpt_lib import verify  # noqa: E402
from ckpt_lib.errors import ConversionError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_arguments(parser)
    args = parser.parse_args()
    try:
        return 0 if verify.run(args) else 1
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
