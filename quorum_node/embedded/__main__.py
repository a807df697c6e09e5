"""``python -m quorum_node.embedded {fetch,start}``: the engine commands without the node's parser.

An entry point, like ``quorum-node`` itself: the commands live in the CLI package (``quorum_node.cli.engine``).
"""

import sys

from quorum_node.cli.engine import main

sys.exit(main())
