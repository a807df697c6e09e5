"""The usage ledger: one record per request, totals equal to what the client saw, a cluster counted once.

The client is the real openai SDK; the ledger is read the ways users read
it: ``quorum-node usage`` (against the running node and, with no node, from
the SQLite file), the admin endpoints, and SQL on the file itself.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node.control.ledger import LEDGER_FILE
from quorum_node.control.usage import parse_since
from tests.cluster.test_cluster import MESSAGES
from tests.conftest import StartFake, StartNode
from tests.support import eventually

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the vLLM fake's model
QUORUM_NODE = str(Path(sys.executable).parent / "quorum-node")


class Seen:
    """The tokens the openai client saw, request by request."""

    def __init__(self) -> None:
        self.requests = 0
        self.prompt = 0
        self.completion = 0
        self.ids: list[str] = []

    def add(self, rid: str, prompt: int, completion: int) -> None:
        self.requests += 1
        self.prompt += prompt
        self.completion += completion
        self.ids.append(rid)


async def workload(client: openai.AsyncOpenAI, model: str, seen: Seen, *, tag: str, n: int = 2) -> None:
    """Non-streamed chats and completions, streams with and without the usage chunk."""
    for i in range(n):
        rid = f"{tag}-chat-{i}"
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "say " + "word " * i}],
            extra_headers={"X-Request-Id": rid},
        )
        assert raw.headers["X-Request-Id"] == rid
        u = raw.parse().usage
        assert u is not None
        seen.add(rid, u.prompt_tokens, u.completion_tokens)

        rid = f"{tag}-compl-{i}"
        c = await client.completions.create(model=model, prompt="one two three", extra_headers={"X-Request-Id": rid})
        assert c.usage is not None
        seen.add(rid, c.usage.prompt_tokens, c.usage.completion_tokens)

        rid = f"{tag}-stream-usage-{i}"
        stream = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": rid},
        )
        chunks = [ch async for ch in stream]
        usage = chunks[-1].usage
        assert usage is not None
        seen.add(rid, usage.prompt_tokens, usage.completion_tokens)
        prompt_of_messages = usage.prompt_tokens

        # Without the usage chunk the client sees the content chunks (the fakes: one token each), and no usage;
        # the node still asked the engine for it, so the ledger has the engine's numbers, not an estimate.
        rid = f"{tag}-stream-plain-{i}"
        stream = await client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers={"X-Request-Id": rid}
        )
        chunks = [ch async for ch in stream]
        assert all(ch.usage is None for ch in chunks)
        tokens = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content)
        seen.add(rid, prompt_of_messages, tokens)


def usage_cli(*args: str) -> dict[str, Any]:
    out = subprocess.run([QUORUM_NODE, "usage", "--json", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def totals(rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    return (
        sum(r["requests"] for r in rows),
        sum(r["prompt_tokens"] for r in rows),
        sum(r["completion_tokens"] for r in rows),
    )


async def test_ledger_totals_equal_the_tokens_the_client_saw(
    start_node: StartNode, fake: StartFake, client_for: Any, tmp_path: Path
) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    seen = Seen()
    await workload(client_for(node), MODEL, seen, tag="local", n=3)
    assert seen.completion > 0 and seen.prompt > 0

    # The running node, through `quorum-node usage` (its admin endpoint): committed before each answer ended.
    data = await asyncio.to_thread(usage_cli, "--url", node.url, "--by", "model")
    assert data["rows"] == [
        {
            "group": MODEL,
            "requests": seen.requests,
            "prompt_tokens": seen.prompt,
            "completion_tokens": seen.completion,
            "errors": 0,
            "estimated": 0,
        }
    ]
    assert data["source"].startswith("node at")
    by_surface = await asyncio.to_thread(usage_cli, "--url", node.url, "--by", "surface", "--since", "1h")
    assert totals(by_surface["rows"]) == (seen.requests, seen.prompt, seen.completion)
    assert (await asyncio.to_thread(usage_cli, "--url", node.url, "--since", "2999-01-01"))["rows"] == []

    # Every record is one row of the SQLite file, with the engine's own numbers (nothing estimated).
    assert node.ledger is not None
    db = sqlite3.connect(node.ledger.path)
    rows = {
        rid: (p, c, est, route, node_)
        for rid, p, c, est, route, node_ in db.execute(
            "SELECT request_id, prompt_tokens, completion_tokens, tokens_estimated, route, serving_node FROM records"
        )
    }
    db.close()
    assert sorted(rows) == sorted(seen.ids)
    assert {v[2:] for v in rows.values()} == {(0, "local", node.name)}

    # With no node running, `quorum-node usage` reads the file itself.
    port = node.port
    await node.stop()
    offline = await asyncio.to_thread(
        usage_cli, "--url", f"http://127.0.0.1:{port}", "--data-dir", str(node.ledger.path.parent)
    )
    assert offline["source"].startswith("ledger ")
    assert totals(offline["rows"]) == (seen.requests, seen.prompt, seen.completion)


async def test_forwarded_requests_link_up_and_the_cluster_counts_each_once(start_cluster: Any, client_for: Any) -> None:
    a, b = await start_cluster(["alpha"], ["beta"])
    seen_a, seen_b = Seen(), Seen()
    await workload(client_for(a.node), "beta", seen_a, tag="fwd")  # entered at a, served by b
    await workload(client_for(b.node), "beta", seen_b, tag="direct")  # entered and served at b
    assert a.node.ledger is not None and b.node.ledger is not None and b.node.cluster is not None

    # (the other records are the /v1/models listings the cluster's start-up polled: no model, no tokens)
    recs_a = {r.request_id: r for r in await a.node.ledger.recent(100) if r.model == "beta"}
    recs_b = {r.request_id: r for r in await b.node.ledger.recent(100) if r.model == "beta"}
    assert sorted(recs_a) == sorted(seen_a.ids)
    assert set(seen_a.ids) <= set(recs_b)  # the serving node's record has the entry node's request id
    a_id = a.node.cluster.node_id if a.node.cluster else None
    for rid in seen_a.ids:
        entry, served = recs_a[rid], recs_b[rid]
        assert (entry.peer, entry.route, entry.serving_node) == (None, "lan", b.name)
        assert (served.peer, served.route, served.serving_node) == (a_id, "local", b.name)
        assert (entry.prompt_tokens, entry.completion_tokens) == (served.prompt_tokens, served.completion_tokens)
        assert not entry.tokens_estimated and not served.tokens_estimated
    assert sum(r.prompt_tokens or 0 for r in recs_a.values()) == seen_a.prompt
    assert sum(r.completion_tokens or 0 for r in recs_a.values()) == seen_a.completion

    # Each node alone: the requests that entered there.
    assert [_d(r) for r in await a.node.ledger.query(None, "model") if r.group == "beta"] == [
        _d(r) for r in [msgspec_row(seen_a)]
    ]
    # The cluster, asked at either node: every request once, though b holds a record of each.
    for node in (a.node, b.node):
        data = await asyncio.to_thread(usage_cli, "--url", node.url, "--cluster", "--by", "node")
        assert sorted(data["nodes"]) == sorted([a.name, b.name]) and data["unreachable"] == []
        served = [r for r in data["rows"] if r["group"] != "-"]  # "-": the model listings, served by no engine
        assert served == [
            {
                "group": b.name,
                "requests": seen_a.requests + seen_b.requests,
                "prompt_tokens": seen_a.prompt + seen_b.prompt,
                "completion_tokens": seen_a.completion + seen_b.completion,
                "errors": 0,
                "estimated": 0,
            }
        ]


def msgspec_row(seen: Seen) -> Any:
    from quorum_node.control.ledger import UsageRow

    return UsageRow(
        group="beta", requests=seen.requests, prompt_tokens=seen.prompt, completion_tokens=seen.completion, errors=0
    )


def _d(row: Any) -> dict[str, Any]:
    return {"requests": row.requests, "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens}


async def test_an_unreachable_peer_is_named_and_the_rest_is_counted(start_cluster: Any, client_for: Any) -> None:
    a, b = await start_cluster(["alpha"], ["beta"], peer_down_after_s=30.0)
    seen = Seen()
    await workload(client_for(a.node), "alpha", seen, tag="a", n=1)
    await b.node.stop()
    out = await asyncio.to_thread(
        subprocess.run,
        [QUORUM_NODE, "usage", "--url", a.node.url, "--cluster"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"unreachable: {b.name} (" in out.stdout
    assert next(line for line in out.stdout.splitlines() if line.startswith("alpha")).split()[1:4] == [
        str(seen.requests),
        str(seen.prompt),
        str(seen.completion),
    ]
    data = await asyncio.to_thread(usage_cli, "--url", a.node.url, "--cluster")
    assert data["nodes"] == [a.name] and [u["node"] for u in data["unreachable"]] == [b.name]


async def test_refused_and_failed_requests_are_recorded_with_their_status(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm")
    node = await start_node(
        backends=[{"kind": "vllm", "url": eng.url}], max_body_bytes=4096, cluster="t", cluster_secret="s3cret"
    )
    url = node.url
    cases = {
        "r400": ("POST", "/v1/chat/completions", b'{"model": 5}', {}),
        "r404model": ("POST", "/v1/chat/completions", json.dumps({"model": "nope", "messages": MESSAGES}).encode(), {}),
        "r404path": ("GET", "/v1/nowhere", b"", {}),
        "r413": ("POST", "/v1/chat/completions", b"x" * 10_000, {}),
    }
    # a 401 for a caller that proved nothing is counted and sampled into the log, not stored (issue 19, 7)
    async with http.post(
        url + "/v1/chat/completions", data=b"{}", headers={"X-Request-Id": "r401", "X-Quorum-Hop": "1"}
    ) as r:  # a peer's, off the peer port
        assert r.status == 401
    for rid, (method, path, body, headers) in cases.items():
        async with http.request(
            method, url + path, data=body, headers={"X-Request-Id": rid, "Content-Type": "application/json", **headers}
        ) as r:
            await r.read()
            assert r.headers["X-Request-Id"] == rid
    eng.next_status = 500  # the engine fails: the client gets a 5xx
    async with http.post(
        url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, headers={"X-Request-Id": "r5xx"}
    ) as r:
        failed_status = r.status
        await r.read()
    assert failed_status >= 500
    assert node.ledger is not None

    async def all_there() -> bool:  # refusals are stored without the client waiting for it
        return len(await node.ledger.recent(100)) >= len(cases) + 1

    await eventually(all_there, "every refusal is in the ledger")
    recs = {r.request_id: r for r in await node.ledger.recent(100)}
    got = {rid: (recs[rid].status, recs[rid].outcome) for rid in [*cases, "r5xx"]}
    assert got == {
        "r400": (400, "rejected"),
        "r404model": (404, "rejected"),
        "r404path": (404, "rejected"),
        "r413": (413, "rejected"),
        "r5xx": (failed_status, "failed"),
    }
    assert "r401" not in recs
    assert recs["r404model"].model == "nope" and recs["r404model"].surface == "openai"
    usage = await node.ledger.query(None, "model")
    assert sum(r.errors for r in usage) == len(cases) + 1


async def test_an_engine_that_gives_no_usage_gets_estimated_tokens_marked_as_such(
    start_node: StartNode, fake: StartFake, client_for: Any
) -> None:
    eng = await fake("openai", models=["m"], omit_usage=True)
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}])
    client = client_for(node)
    prompt = [{"role": "user", "content": "x" * 40}]  # 40 characters: 10 tokens at ~4 characters a token
    chat = await client.chat.completions.create(model="m", messages=prompt, extra_headers={"X-Request-Id": "whole"})
    assert chat.usage is None  # the client sees what the engine said
    answer = chat.choices[0].message.content or ""
    assert answer
    compl = await client.completions.create(
        model="m",
        prompt="one two three four",  # 18 characters: 5 tokens
        extra_headers={"X-Request-Id": "compl"},
    )
    stream = await client.chat.completions.create(
        model="m",
        messages=prompt,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Request-Id": "stream"},
    )
    chunks = [ch async for ch in stream]
    assert all(ch.usage is None for ch in chunks)
    # a stream's completion tokens: its chunks of text, counted (not the opening role chunk, not the finish)
    choice_chunks = sum(
        1 for ch in chunks if ch.choices and (ch.choices[0].delta.content or ch.choices[0].delta.tool_calls)
    )
    assert node.ledger is not None
    recs = {r.request_id: r for r in await node.ledger.recent(10)}
    assert (recs["whole"].prompt_tokens, recs["whole"].completion_tokens) == (10, -(-len(answer) // 4))
    assert (recs["compl"].prompt_tokens, recs["compl"].completion_tokens) == (5, -(-len(compl.choices[0].text) // 4))
    assert (recs["stream"].prompt_tokens, recs["stream"].completion_tokens) == (10, choice_chunks)
    assert all(recs[rid].tokens_estimated for rid in ("whole", "compl", "stream"))

    # The totals say how many of their requests were estimated, and the table marks them.
    data = await asyncio.to_thread(usage_cli, "--url", node.url, "--by", "model")
    (row,) = [r for r in data["rows"] if r["group"] == "m"]
    assert row["requests"] == 3 and row["estimated"] == 3 and row["prompt_tokens"] == 25
    out = await asyncio.to_thread(
        subprocess.run, [QUORUM_NODE, "usage", "--url", node.url], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("m "))
    assert "~25" in line.split() and "~: includes the estimated tokens of 3 requests" in out.stdout


async def test_the_usage_endpoints_are_for_admins_only(
    start_node: StartNode, fake: StartFake, client_for: Any, http: aiohttp.ClientSession
) -> None:
    """Under --require-key (callers held to the off-loopback rule): no key 401, a plain key 403, an admin key 200
    (and ``quorum-node usage --api-key``); the true off-loopback path is in test_keys_cluster.py."""
    node = await start_node(require_key=True)
    _, admin = node.keys.create("ops", admin=True)
    _, plain = node.keys.create("app")
    for path in (
        "/quorum/admin/usage",
        "/quorum/admin/usage?cluster=1",
        "/quorum/admin/usage/series",
        "/quorum/admin/recent",
        "/quorum/admin/keys",
    ):
        async with http.get(node.url + path) as r:
            assert r.status == 401, path
        async with http.get(node.url + path, headers={"Authorization": f"Bearer {plain}"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "not_admin", path
        async with http.get(node.url + path, headers={"x-api-key": admin}) as r:
            assert r.status == 200, path
    refused = await asyncio.to_thread(
        subprocess.run,
        [QUORUM_NODE, "usage", "--url", node.url, "--api-key", plain],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1 and "admin API" in refused.stderr
    assert (await asyncio.to_thread(usage_cli, "--url", node.url, "--api-key", admin))["source"].startswith("node")


async def test_admin_endpoints_refuse_bad_parameters_with_400(
    start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    node = await start_node()
    for path in (
        "/quorum/admin/usage?by=password",
        "/quorum/admin/usage?since=yesterday-ish",
        "/quorum/admin/usage?since=nan",
        "/quorum/admin/usage/series?bucket=0",
        "/quorum/admin/usage/series?bucket=1&since=30d",
        "/quorum/admin/recent?limit=-1",
        "/quorum/admin/recent?limit=99999999999999999999",
        "/quorum/admin/usage?since=%00",
    ):
        async with http.get(node.url + path) as r:
            body = await r.json()
            assert r.status == 400, (path, body)
            assert body["error"]["type"] == "invalid_request_error"
    async with http.get(node.url + "/quorum/admin/usage/series?bucket=60&since=1h&by=day") as r:
        points = (await r.json())["points"]  # the refusals above, if stored yet
        assert r.status == 200 and all(p["group"].count("-") == 2 and p["t"] % 60 == 0 for p in points)
    async with http.get(node.url + "/quorum/admin/recent?limit=5") as r:
        assert r.status == 200


async def test_peer_usage_endpoint_needs_a_signature(start_cluster: Any, http: aiohttp.ClientSession) -> None:
    (a,) = await start_cluster(["alpha"])
    async with http.get(a.node.url + "/quorum/v1/usage?by=model") as r:
        assert r.status == 401


async def test_series_buckets_the_workload(
    start_node: StartNode, fake: StartFake, client_for: Any, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}])
    seen = Seen()
    await workload(client_for(node), MODEL, seen, tag="s", n=1)
    async with http.get(node.url + "/quorum/admin/usage/series?since=1h&bucket=3600&by=model") as r:
        points = (await r.json())["points"]
    assert sum(p["requests"] for p in points) == seen.requests
    assert sum(p["completion_tokens"] for p in points) == seen.completion
    assert {p["group"] for p in points} == {MODEL}


async def test_no_ledger_setting_keeps_no_file(
    start_node: StartNode, fake: StartFake, client_for: Any, http: aiohttp.ClientSession
) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], ledger=False)
    await client_for(node).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert node.ledger is None and not (Path(node.settings.data_dir) / LEDGER_FILE).exists()
    async with http.get(node.url + "/quorum/admin/usage") as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "ledger_off"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", 1_000_000 - 3600),
        ("7d", 1_000_000 - 7 * 86400),
        ("90s", 1_000_000 - 90),
        ("2w", 1_000_000 - 14 * 86400),
        ("1970-01-02", 86400.0),
        ("1970-01-01T01:00:00+01:00", 0.0),
        ("12345.5", 12345.5),
        (None, None),
        ("", None),
    ],
)
def test_since_accepts_durations_dates_and_epochs(text: str | None, expected: float | None) -> None:
    assert parse_since(text, now=1_000_000) == expected


@pytest.mark.parametrize("text", ["yesterday", "1y", "-", "inf", "nan", "2025-13-01", "1h ago"])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="since"):
        parse_since(text, now=1_000_000)


async def test_ledger_survives_a_restart_and_reopens(
    start_node: StartNode, fake: StartFake, client_for: Any, tmp_path: Path
) -> None:
    eng = await fake("vllm")
    node = await start_node(backends=[{"kind": "vllm", "url": eng.url}], name="same", data_dir=str(tmp_path / "d"))
    await client_for(node).chat.completions.create(model=MODEL, messages=MESSAGES)
    await node.stop()
    again = await start_node(backends=[{"kind": "vllm", "url": eng.url}], name="same", data_dir=str(tmp_path / "d"))
    await client_for(again).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert again.ledger is not None
    assert [r.requests for r in await again.ledger.query(None, "model")] == [2]
