"""``python -m quorum_node.embedded {fetch,start}``: the engine commands without the node's CLI."""

import sys

from quorum_node.embedded.cli import main

sys.exit(main())
