"""quorum-relay: forwards frames between Quorum nodes that cannot reach each other directly.

Nodes behind NAT dial out to the relay over one WebSocket each; the relay
admits them by token into a namespace, tells each who else of its namespace is
online, and passes frames between them without reading their payloads (the
nodes encrypt those end to end). It never imports ``quorum_node``: it ships
alone to a VPS.

Modules, in the order they import each other:

    wire       the frames (shared with the node side) and close codes
    errors     the error tree
    identity   node id = hash of the node's Ed25519 key; checking its proof   (pure)
    tokens     tokens → namespaces, constant-time lookup, the tokens file     (pure)
    limits     handshake token buckets, connections per address, proxies     (pure)
    presence   who is online per namespace                                  (pure)
    streams    the stream table: open/close/reset, limits, peer gone        (pure)
    splice     rewriting a frame's ``peer`` without re-encoding it          (pure)
    settings   the one Settings object (env + flags)
    metrics    counters and the Prometheus collector
    hub        routing: presence, streams, forwarding (no I/O of its own)
    conn       one node's connection: bounded send queue, writer, pings
    responses  plain HTTP answers from the handshake
    server     ``Relay``: the websockets server, admission, handlers, sweeper
    cli        the ``quorum-relay`` command (its log set-up: ``quorum_common.log``)
"""
