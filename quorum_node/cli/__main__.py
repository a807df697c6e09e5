"""``python -m quorum_node.cli`` is ``quorum-node``."""

import sys

from . import main

sys.exit(main())
