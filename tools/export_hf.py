"""`python tools/export_hf.py ...` is `wsd-pretrain ckpt export-hf ...` (see `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsd_pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["ckpt", "export-hf", *sys.argv[1:]]))
