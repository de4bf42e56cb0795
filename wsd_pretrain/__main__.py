"""``python -m wsd_pretrain`` is the ``wsd-pretrain`` command."""

import sys

from .cli import main

sys.exit(main())
