"""The real engine, built once per machine and cached (``quorum-node engine fetch``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quorum_node.embedded.fetch import ensure_llama_server, ensure_model
from quorum_node.settings import load_settings


@pytest.fixture(scope="session")
def cache() -> Path:
    return Path(load_settings().cache_dir)  # the node's: $QUORUM_CACHE_DIR, else ~/.cache/quorum


@pytest.fixture(scope="session")
def llama_server(cache: Path) -> Path:
    return ensure_llama_server(cache)


@pytest.fixture(scope="session")
def model(cache: Path) -> Path:
    return ensure_model(cache)
