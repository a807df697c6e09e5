"""Conversations for the affinity test and ``scripts/bench-cluster``: each opens with a document of its own.

The documents are deterministic (a seed each) and unlike one another from their first words, so no two
conversations share a cached prompt prefix beyond the system prompt's opening words.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["opening", "sentences"]

_WORDS = (
    "river stone market winter garden engine letter harbor silver forest window cotton lantern bridge "
    "valley copper meadow signal orchard thunder candle ladder marble pocket saddle timber violet basket "
    "canyon feather glacier hammer island jacket kettle lemon mirror needle ocean pepper quiver ribbon "
    "shadow tunnel umbrella velvet wagon yellow zephyr anchor bottle castle desert falcon"
)
VOCAB = tuple(_WORDS.split())


def sentences(seed: int) -> Iterator[str]:
    """Conversation ``seed``'s document, a sentence at a time: its title, then sentences of 6 to 12 words."""
    rng = random.Random(seed)
    yield f"Document {seed}."
    while True:
        yield " ".join(rng.choice(VOCAB) for _ in range(rng.randint(6, 12))).capitalize() + "."


def opening(doc: str) -> list[dict[str, str]]:
    """A conversation's first turn: the document in the system prompt, and a question about it."""
    return [
        {"role": "system", "content": "You answer questions about this document.\n\n" + doc},
        {"role": "user", "content": "What is the document about?"},
    ]
