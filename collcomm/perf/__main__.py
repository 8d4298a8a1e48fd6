"""``python -m collcomm.perf``: the same as the ``collcomm-perf`` command."""

import sys

from collcomm.perf.main import main

sys.exit(main())
