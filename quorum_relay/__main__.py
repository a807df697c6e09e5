"""``python -m quorum_relay`` is ``quorum-relay``."""

import sys

from .cli import main

sys.exit(main())
