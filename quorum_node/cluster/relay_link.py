"""The relay link's old import path: it lives in the ``relay`` package now (``relay/__init__.py``)."""

from .relay import CHUNK, WINDOW, RelayAnswer, RelayBody, RelayLink, RelayLinkError

__all__ = ["CHUNK", "WINDOW", "RelayAnswer", "RelayBody", "RelayLink", "RelayLinkError"]
