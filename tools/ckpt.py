"""The checkpoint tools as a script: ``python tools/ckpt.py list runs/tiny`` is ``wsd-pretrain ckpt list runs/tiny``.

Subcommands: list, inspect, verify, export-hf, from-deepspeed, reshard, to-dcp, from-dcp (``--help`` on each).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsd_pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["ckpt", *sys.argv[1:]]))
