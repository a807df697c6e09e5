"""``python -m quorum_node.engine {fetch,start}``: the engine commands without the node's CLI."""

import sys

from quorum_node.engine.cli import main

sys.exit(main())
