"""``python -m collcomm.cli``: the same as the ``collcomm`` command."""

import sys

from collcomm.cli import main

sys.exit(main())
