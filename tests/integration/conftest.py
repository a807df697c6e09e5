"""The real engine, built once per machine and cached (``quorum-node engine fetch``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quorum_node.embedded.fetch import cache_dir, ensure_llama_server, ensure_model


@pytest.fixture(scope="session")
def cache() -> Path:
    return cache_dir(os.environ.get("QUORUM_CACHE_DIR"))


@pytest.fixture(scope="session")
def llama_server(cache: Path) -> Path:
    return ensure_llama_server(cache)


@pytest.fixture(scope="session")
def model(cache: Path) -> Path:
    return ensure_model(cache)
