"""The token estimate for answers that came without usage: ~4 characters a token, token ids counted exactly."""

from __future__ import annotations

from quorum_node.control.tokens import answer_tokens, estimate, prompt_tokens


def test_four_characters_a_token_rounded_up() -> None:
    assert [estimate(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_a_chats_prompt_counts_every_kind_of_message_text() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "x" * 40},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y" * 20},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 999}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "name": "abcd",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"q":"z"}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "w" * 12},
        ]
    }
    # 40 + 20 (the image is not text) + 4 (name) + 3 + 9 (the call) + 12 = 88 characters
    assert prompt_tokens("chat", body) == 22
    assert prompt_tokens("chat", {"messages": "not a list"}) == 0


def test_token_ids_are_counted_exactly() -> None:
    assert prompt_tokens("completions", {"prompt": "one two three four"}) == 5  # 18 characters
    assert prompt_tokens("completions", {"prompt": [1, 2, 3]}) == 3
    assert prompt_tokens("completions", {"prompt": ["abcd", "efgh"]}) == 2
    assert prompt_tokens("embeddings", {"input": [[1, 2], [3, 4, 5]]}) == 5


def test_an_answers_text_content_reasoning_and_tool_calls() -> None:
    chat = {
        "choices": [
            {"message": {"content": "Hello, world!", "reasoning_content": "hmm."}},
            {"message": {"content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}},
        ]
    }
    assert answer_tokens("chat", chat) == 5  # 13 + 4 + 3 characters
    assert answer_tokens("completions", {"choices": [{"text": "abcdefgh"}]}) == 2
    assert answer_tokens("embeddings", {"data": [{"embedding": [0.1]}]}) is None  # embeddings have no completion
    assert answer_tokens("chat", {"choices": "junk"}) == 0
