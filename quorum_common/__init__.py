"""What quorum-node and quorum-relay both need, in one copy.

The relay ships alone and never imports ``quorum_node``; the node and the
relay each import this package instead of keeping copies of their own. It
imports neither of them.

    log   structlog set-up: console renderer on a TTY, JSON lines otherwise
"""
