"""Token counts for a request whose engine gave no usage: an estimate, marked as one.

The node always asks the engine for usage (streams too, ``include_usage``);
the numbers here are only for the answers that came without it. A streamed
answer's completion tokens are its content chunks (one token each on every
engine Quorum speaks); everything else is estimated from text at
``CHARS_PER_TOKEN`` characters a token, rounded up: about right for English
with the BPE vocabularies of current models, low for code and for scripts
written without spaces. Token ids (a completions ``prompt`` or an embeddings
``input`` given as integers) are counted exactly.

Which text counts: for a prompt, the messages' content (strings and text
parts), names and tool-call arguments, a completion's ``prompt``, an
embedding's ``input``; for an answer, every choice's content, reasoning and
tool calls (chat) or ``text`` (completions). Pure logic.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHARS_PER_TOKEN", "answer_tokens", "estimate", "prompt_tokens"]

CHARS_PER_TOKEN = 4


def estimate(chars: int) -> int:
    """Tokens for ``chars`` characters of text (0 for none)."""
    return -(-chars // CHARS_PER_TOKEN)


def _chars(value: Any) -> tuple[int, int]:
    """(characters of text, token ids) in a content value: a string, parts, or token ids."""
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, list):
        chars = ids = 0
        for v in value:
            if isinstance(v, int) and not isinstance(v, bool):
                ids += 1
            elif isinstance(v, dict):
                text = v.get("text")
                if isinstance(text, str):
                    chars += len(text)
            else:
                c, i = _chars(v)
                chars += c
                ids += i
        return chars, ids
    return 0, 0


def _tool_calls(calls: Any) -> int:
    chars = 0
    if isinstance(calls, list):
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for field in ("name", "arguments"):
                    if isinstance(fn.get(field), str):
                        chars += len(fn[field])
    return chars


def prompt_tokens(op: str, body: dict[str, Any]) -> int:
    """The estimated prompt tokens of an OpenAI-shaped request body (chat, completions, embeddings)."""
    if op == "chat":
        chars = ids = 0
        messages = body.get("messages")
        for m in messages if isinstance(messages, list) else ():
            if not isinstance(m, dict):
                continue
            c, i = _chars(m.get("content"))
            chars += c + _tool_calls(m.get("tool_calls"))
            ids += i
            if isinstance(m.get("name"), str):
                chars += len(m["name"])
        return estimate(chars) + ids
    c, i = _chars(body.get("prompt" if op == "completions" else "input"))
    return estimate(c) + i


def answer_tokens(op: str, payload: dict[str, Any]) -> int | None:
    """The estimated completion tokens of a whole OpenAI-shaped answer (None for embeddings: there are none)."""
    if op == "embeddings":
        return None
    chars = 0
    choices = payload.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if op == "completions":
            if isinstance(choice.get("text"), str):
                chars += len(choice["text"])
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        for field in ("content", "reasoning_content", "reasoning"):
            chars += _chars(message.get(field))[0]
        chars += _tool_calls(message.get("tool_calls"))
    return estimate(chars)
