"""API keys on one node: the openai SDK with ``api_key=``, what each wrong key gets, scopes, rate, the admin
API, the CLI.

Most tests run the node with ``--require-key`` so that loopback callers are
treated as any other caller would be; the true off-loopback path (a caller in
another network namespace) is in ``test_keys_cluster.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import structlog

from quorum_node import cli
from quorum_node.control.admin_token import ADMIN_TOKEN_FILE, admin_headers, load_or_create
from quorum_node.control.keys import KEYS_FILE
from quorum_node.node import Node
from tests.support import eventually

MESSAGES = [{"role": "user", "content": "hi"}]
QN = str(Path(sys.executable).with_name("quorum-node"))


async def keyed_node(start_node, fake, *, models=("alpha", "beta"), **settings: Any) -> Node:
    eng = await fake("openai", models=list(models))
    return await start_node(backends=[{"kind": "openai", "url": eng.url}], **settings)


def sdk(node: Node, key: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0, **kw)


async def chat(node: Node, key: str, model: str = "alpha") -> str:
    async with sdk(node, key) as client:
        out = await client.chat.completions.create(model=model, messages=MESSAGES)
    return out.choices[0].message.content or ""


async def test_a_key_lets_the_openai_sdk_in_and_only_its_hash_is_stored(start_node, fake, tmp_path) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    info, key = node.keys.create("phone")
    assert key.startswith("qk_") and len(key) >= 3 + 43
    assert await chat(node, key) == "Hello, world!"
    async with sdk(node, key) as client:  # streamed too
        stream = await client.chat.completions.create(model="alpha", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello, world!"
    stored = (Path(node.settings.data_dir) / KEYS_FILE).read_text()
    assert key not in stored and key[3:] not in stored and info.id in stored
    listed = {k.id: k for k in node.keys.list()}
    assert listed[info.id].last_used is not None and listed[info.id].prefix == key[:11]


async def test_missing_wrong_revoked_and_expired_keys_get_401(start_node, fake) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    _, revoked = node.keys.create("old")
    node.keys.revoke("old")
    _, expiring = node.keys.create("short", expires_s=0.3)
    assert await chat(node, expiring)
    cases = {"qk_" + "x" * 43: "invalid_api_key", "sk-not-ours": "invalid_api_key", revoked: "revoked_api_key"}
    for key, code in cases.items():
        with pytest.raises(openai.AuthenticationError) as e:
            await chat(node, key)
        assert e.value.status_code == 401 and e.value.code == code, key
        assert e.value.body["type"] == "authentication_error"

    async def expired() -> bool:
        try:
            await chat(node, expiring)
        except openai.AuthenticationError as e:
            return e.code == "expired_api_key"
        return False

    await eventually(expired, timeout_s=3.0, what="the key expires")


async def test_a_scoped_key_gets_403_for_other_models_and_200_for_its_own(start_node, fake) -> None:
    node = await keyed_node(start_node, fake, models=("llama3.1:8b", "llama3.2:1b", "qwen2.5:7b"), require_key=True)
    _, key = node.keys.create("llama-only", models=["llama3*"])
    assert await chat(node, key, "llama3.1:8b") and await chat(node, key, "llama3.2:1b")
    with pytest.raises(openai.PermissionDeniedError) as e:
        await chat(node, key, "qwen2.5:7b")
    assert e.value.status_code == 403 and e.value.code == "model_not_allowed"
    async with sdk(node, key) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.embeddings.create(model="qwen2.5:7b", input="x")


async def test_a_key_over_its_rate_gets_429_with_retry_after(start_node, fake, http) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    _, key = node.keys.create("slow", rate_per_min=2)
    _, other = node.keys.create("other", rate_per_min=2)
    assert await chat(node, key) and await chat(node, key)
    with pytest.raises(openai.RateLimitError) as e:
        await chat(node, key)
    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
    retry_after = int(e.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 30  # one request every 30 s
    assert await chat(node, other)  # the bucket is the key's own


async def test_the_anthropic_sdk_header_x_api_key_works_too(start_node, fake, http) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    _, key = node.keys.create("claude-app")
    async with http.get(node.url + "/v1/models", headers={"x-api-key": key}) as resp:
        assert resp.status == 200
    async with http.get(node.url + "/v1/models", headers={"x-api-key": key + "x"}) as resp:
        assert resp.status == 401


async def test_loopback_needs_no_key_but_a_wrong_quorum_key_is_still_refused(start_node, fake) -> None:
    node = await keyed_node(start_node, fake)
    assert await chat(node, "sk-no-key-required")  # what SDK users put in when the server wants none
    with pytest.raises(openai.AuthenticationError):
        await chat(node, "qk_" + "y" * 43)
    _, key = node.keys.create("scoped", models=["beta"])
    with pytest.raises(openai.PermissionDeniedError):  # a valid key is applied, loopback or not
        await chat(node, key, "alpha")


async def test_health_stays_open_under_require_key(start_node, fake, http) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    async with http.get(node.url + "/health") as resp:
        assert resp.status == 200
    async with http.get(node.url + "/v1/models") as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["code"] == "missing_api_key" and body["error"]["type"] == "authentication_error"


async def test_health_tells_a_stranger_only_that_the_node_is_alive(start_node, fake, http) -> None:
    """Issue 19, 14: without a key /health names neither the node nor its load; a key (or loopback trust) does."""
    node = await keyed_node(start_node, fake, require_key=True)
    _, key = node.keys.create("monitor")
    for headers in ({}, {"X-Quorum-Admin": "x" * 43}, {"Accept": "application/json"}):
        async with http.get(node.url + "/health", headers=headers) as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}, headers
    async with http.get(node.url + "/health", headers={"Authorization": f"Bearer {key}"}) as resp:
        full = await resp.json()
    assert full["status"] == "ok" and full["node"] == node.name and {"in_flight", "connections"} <= set(full)
    trusting = await keyed_node(start_node, fake)  # no --require-key: this test's loopback caller is trusted
    async with http.get(trusting.url + "/health") as resp:
        assert (await resp.json())["node"] == trusting.name


@pytest.mark.parametrize(
    "header",
    [
        "Bearer " + "qk_" + "a" * 5000,
        "Bearer qk_\u00e9\u00e9\u00e9",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "bearer   qk_" + "b" * 43,
    ],
)
async def test_hostile_authorization_headers_get_a_clean_401(start_node, fake, http, header) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    async with http.get(node.url + "/v1/models", headers={"Authorization": header}) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_the_key_never_appears_in_the_logs(start_node, fake) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    _, key = node.keys.create("secretive", models=["alpha"], rate_per_min=3)
    with structlog.testing.capture_logs() as logs:
        await chat(node, key)  # 1 of 3
        with pytest.raises(openai.PermissionDeniedError):
            await chat(node, key, "beta")  # 2 of 3 (a refused request is still a request)
        await chat(node, key)  # 3 of 3
        with pytest.raises(openai.RateLimitError):
            await chat(node, key)
        with pytest.raises(openai.AuthenticationError):
            await chat(node, key[:-1] + ("A" if key[-1] != "A" else "B"))
    text = json.dumps(logs, default=str)
    assert key not in text and key[3:20] not in text
    lines = [e for e in logs if e["event"] == "request"]
    assert {e["status"] for e in lines} >= {200, 403, 429}
    assert any(e.get("key") == "secretive" and e["status"] == 200 for e in lines)
    assert [e["reason"] for e in logs if e["event"] == "unauthenticated_request"] == ["invalid_key"]  # the wrong one


async def test_strangers_401s_are_counted_and_sampled_not_stored(start_node, fake, http) -> None:
    """Issue 19, 7: anyone who reaches the port can send 401s as fast as it likes; each one used to cost a
    ledger row and a log line (~1.5 kB, kept 90 days). Now: no row, a bounded log, every one counted."""
    node = await keyed_node(start_node, fake, require_key=True)
    _, key = node.keys.create("app")
    strangers = ({}, {"Authorization": "Bearer qk_" + "x" * 43}, {"X-Quorum-Hop": "1"}, {"X-Quorum-Admin": "y" * 43})
    n = 240
    loop = asyncio.get_running_loop()
    with structlog.testing.capture_logs() as logs:
        t0 = loop.time()
        for i in range(n):
            async with http.get(
                node.url + "/v1/models", headers={"X-Request-Id": f"stranger-{i}", **strangers[i % len(strangers)]}
            ) as resp:
                assert resp.status == 401
        elapsed_s = loop.time() - t0
        # a caller with a key whose request fails still has its record, as before
        async with http.get(
            node.url + "/v1/models/nope", headers={"Authorization": f"Bearer {key}", "X-Request-Id": "known-404"}
        ) as resp:
            assert resp.status == 404
    assert node.ledger is not None

    async def stored() -> bool:
        return any(r.request_id == "known-404" for r in await node.ledger.recent(1000))

    await eventually(stored, what="the keyed request's record")
    assert not [r for r in await node.ledger.recent(1000) if r.request_id.startswith("stranger")]
    sampled = [e for e in logs if e["event"] == "unauthenticated_request"]
    assert 1 <= len(sampled) <= elapsed_s + 1, (len(sampled), elapsed_s)  # one a second at most
    assert sum(e["passed_over"] for e in sampled) + len(sampled) <= n
    assert not [e for e in logs if e["event"] == "request" and e["status"] == 401]
    async with http.get(node.url + "/metrics", headers={"Authorization": f"Bearer {key}"}) as resp:
        text = await resp.text()
    counted = {
        reason: float(re.search(rf'^quorum_refused_requests_total{{reason="{reason}"}} (\S+)$', text, re.M).group(1))  # type: ignore[union-attr]
        for reason in ("missing_key", "invalid_key", "peer_claim", "admin_token")
    }
    assert counted == dict.fromkeys(counted, n / len(strangers))


# -- the admin API -------------------------------------------------------------------


async def test_the_admin_api_creates_lists_and_revokes(start_node, fake, http) -> None:
    node = await keyed_node(start_node, fake)
    body = {"name": "laptop", "models": ["alpha"], "expires": "30d", "rate": 60}
    async with http.post(node.url + "/quorum/admin/keys", json=body) as resp:
        assert resp.status == 201
        made = await resp.json()
    key, info = made["key"], made["info"]
    assert info["name"] == "laptop" and info["models"] == ["alpha"] and info["rate_per_min"] == 60
    assert info["expires"] - info["created"] == pytest.approx(30 * 86400)
    assert await chat(node, key)
    async with http.get(node.url + "/quorum/admin/keys") as resp:
        listed = await resp.json()
    assert [k["name"] for k in listed["keys"]] == ["laptop"]
    assert key not in json.dumps(listed) and "hash" not in listed["keys"][0]
    async with http.post(node.url + "/quorum/admin/keys", json={"name": "laptop"}) as resp:
        assert resp.status == 409  # a live key of that name exists
    async with http.delete(node.url + "/quorum/admin/keys/laptop") as resp:
        assert resp.status == 200 and (await resp.json())["info"]["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        await chat(node, key)
    async with http.delete(node.url + "/quorum/admin/keys/nobody") as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"name": ""}',
        b'{"name": "x", "rate": 0}',
        b'{"name": "x", "rate": true}',
        b'{"name": "x", "expires": "soon"}',
        b'{"name": "x", "models": ["' + b"m" * 300 + b'"]}',
        b'{"name": "x", "unknown": 1}',
        b'{"name": "x", "models": [' + b'"a",' * 40 + b'"a"]}',
        # issue 19, 11: not UTF-8 inside a string (a 500 with a traceback before), and other wrong values
        b'{"name": "\xff"}',
        b'{"name": "x", "models": ["a\xc3"]}',
        b'{"name": "x", "expires": "1\xe9d"}',
        b'\xef\xbb\xbf{"name": "x"}',
        b'{"name": "x", "rate": 1e400}',
        b'{"name": "x", "rate": 99999999999999999999}',
        b'{"name": "x", "expires": 1e308}',
        b'{"name": "x", "expires": "inf"}',
        b'{"name": "\\ud800"}',
        b'{"name": "x", "admin": "yes"}',
        b'{"name": {"a": 1}}',
        b"null",
        b"",
    ],
)
async def test_bad_admin_requests_get_400(start_node, fake, http, body) -> None:
    node = await keyed_node(start_node, fake)
    async with http.post(
        node.url + "/quorum/admin/keys", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400, await resp.text()
        assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
    assert node.keys.list() == []


_NOT_UTF8 = b"\xff\xfe\xc3("
_BAD_VALUES = ("%FF%FE%C3(", "%ED%A0%80", "%00", "-1", "1" + "0" * 5000, "1e400", "nan", "-1e300", "\u0663", "x" * 5000)


async def test_every_admin_endpoint_answers_bad_input_with_a_4xx(start_node, fake, http) -> None:
    """Issue 19, 11: whatever an admin sends (bytes that are not UTF-8, not JSON, wrong types, huge values, in
    the body, the query or the path) the answer is a 4xx in the OpenAI error shape, or a plain answer; never a
    500 with a traceback."""
    node = await keyed_node(start_node, fake)
    prefix = "/quorum/admin/"
    app = node.app  # type: ignore[union-attr]  (every admin route the node has: a new one is probed too)
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith(prefix) and r.method != "HEAD"
    }
    assert routes >= {
        ("GET", prefix + "keys"),
        ("POST", prefix + "keys"),
        ("DELETE", prefix + "keys/{name_or_id}"),
        ("GET", prefix + "usage"),
        ("GET", prefix + "usage/series"),
        ("GET", prefix + "recent"),
        ("GET", prefix + "fleet"),
        ("GET", prefix + "events"),
    }
    bodies = (
        _NOT_UTF8,
        b'{"name": "' + _NOT_UTF8 + b'"}',
        b"{",
        b'{"name": 5}',
        b'{"name": "' + b"n" * 70_000 + b'"}',
        b'{"name": "x", "rate": 1' + b"0" * 400 + b"}",
        b'{"name": "x", "models": [[[[[[[[[[]]]]]]]]]]}',
        b'{"name": "x", "expires": "1' + _NOT_UTF8 + b'd"}',
    )
    statuses: list[int] = []

    async def probe(method: str, url: str, body: bytes | None = None) -> None:
        async with http.request(method, url, data=body, headers={"Content-Type": "application/json"}) as resp:
            statuses.append(resp.status)
            assert resp.status < 500, (method, url[:200], (body or b"")[:40], await resp.text())
            if resp.status >= 400:
                assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}

    with structlog.testing.capture_logs() as logs:
        for method, path in sorted(routes):
            urls = (
                [node.url + path.replace("{name_or_id}", v) for v in _BAD_VALUES] if "{" in path else [node.url + path]
            )
            if not path.endswith("/events"):  # a stream: only its query is probed
                for url in urls:
                    for body in bodies:
                        await probe(method, url, body)
            for name in ("key", "since", "by", "bucket", "limit", "cluster"):
                for value in _BAD_VALUES:
                    await probe(method, f"{urls[0]}?{name}={value}")
    assert not [e for e in logs if e["event"] == "handler_crashed"]
    assert 400 in statuses  # the probes were refused, not all passed over
    assert node.keys.list() == []  # and none of them made a key


async def test_under_require_key_the_admin_api_needs_an_admin_key(start_node, fake, http) -> None:
    node = await keyed_node(start_node, fake, require_key=True)
    _, admin = node.keys.create("ops", admin=True)
    _, plain = node.keys.create("app")
    url = node.url + "/quorum/admin/keys"
    async with http.get(url) as resp:
        assert resp.status == 401
    async with http.get(url, headers={"Authorization": f"Bearer {plain}"}) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "not_admin"
    async with http.post(url, json={"name": "new"}, headers={"Authorization": f"Bearer {admin}"}) as resp:
        assert resp.status == 201


# -- the CLI -----------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``quorum-node ...``; stdout without the in-process node's own log lines (they print there in tests)."""
    code = cli.main(list(args))
    out = capsys.readouterr()
    mine = "\n".join(line for line in out.out.splitlines() if "[info" not in line and "[warning" not in line)
    return code, mine, out.err


async def test_the_cli_against_a_running_node(start_node, fake, capsys) -> None:
    node = await keyed_node(start_node, fake)
    url = ["keys", "--url", node.url]
    code, out, _ = await asyncio.to_thread(
        run_cli,
        capsys,
        *url,
        "create",
        "--name",
        "tablet",
        "--models",
        "alpha",
        "beta",
        "--rate",
        "10",
        "--expires",
        "12h",
    )
    assert code == 0
    key = out.strip()
    assert key.startswith("qk_") and await chat(node, key)
    code, out, _ = await asyncio.to_thread(run_cli, capsys, *url, "list")
    assert code == 0 and "tablet" in out and "alpha,beta" in out and "10/min" in out and key not in out
    code, out, _ = await asyncio.to_thread(run_cli, capsys, *url, "revoke", "tablet")
    assert code == 0 and "revoked" in out
    with pytest.raises(openai.AuthenticationError):
        await chat(node, key)
    code, _, err = await asyncio.to_thread(run_cli, capsys, *url, "revoke", "nobody")
    assert code == 1 and "No key" in err


async def _quorum_node(*args: str) -> tuple[int, str, str]:
    """The real ``quorum-node`` command, as its user runs it (its own process, no QUORUM_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    proc = await asyncio.create_subprocess_exec(
        QN, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_owner_makes_the_first_admin_key_of_a_require_key_node_with_the_cli(
    start_node, fake, http, tmp_path
) -> None:
    """Issue 19, 16: under --require-key, ``keys create`` on the node's machine, as its user, used to be refused
    until the node was stopped. The node's admin token (its data dir, 0600) lets the CLI in, from loopback."""
    with structlog.testing.capture_logs() as logs:
        node = await keyed_node(start_node, fake, require_key=True)
        data_dir = Path(node.settings.data_dir)
        token_file = data_dir / ADMIN_TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        url = node.url + "/quorum/admin/keys"

        code, out, err = await _quorum_node(
            "keys", "--url", node.url, "--data-dir", str(data_dir), "create", "--name", "ops", "--admin"
        )
        assert code == 0, err
        admin = out.strip()
        async with http.get(url, headers={"Authorization": f"Bearer {admin}"}) as resp:  # the key made is an admin's
            assert resp.status == 200 and [k["name"] for k in (await resp.json())["keys"]] == ["ops"]
        code, out, err = await _quorum_node("usage", "--url", node.url, "--data-dir", str(data_dir), "--json")
        assert code == 0 and json.loads(out)["source"].startswith("node"), err

        async with http.post(url, json={"name": "nobody"}) as resp:  # the same request without the token
            assert resp.status == 401
        for wrong in ("z" * 43, token[:-1] + ("A" if token[-1] != "A" else "B"), token + "x", "", "é"):
            async with http.post(url, json={"name": "nobody"}, headers={"X-Quorum-Admin": wrong}) as resp:
                assert resp.status == 401, wrong
        async with http.get(node.url + "/v1/models", headers={"X-Quorum-Admin": token}) as resp:
            assert resp.status == 401  # admin rights on /quorum/admin/ only, not the API
        code, _, err = await _quorum_node(
            "keys", "--url", node.url, "--data-dir", str(tmp_path / "elsewhere"), "create", "--name", "nobody"
        )  # a user without the token
        assert code == 1 and "requires an API key" in err and "no admin token readable" in err
    assert [k.name for k in node.keys.list()] == ["ops"]
    assert token not in json.dumps(logs, default=str)

    await node.stop()  # the token is the node's for good: the same after a restart
    again = await keyed_node(start_node, fake, require_key=True, data_dir=str(data_dir))
    async with http.get(again.url + "/quorum/admin/keys", headers={"X-Quorum-Admin": token}) as resp:
        assert resp.status == 200


async def test_the_cli_sends_the_admin_token_only_to_this_machine(tmp_path) -> None:
    data_dir = tmp_path / "d"
    token = load_or_create(data_dir).decode()
    for url in ("http://127.0.0.1:32768", "http://localhost:1", "http://[::1]:2", "http://app.localhost"):
        assert admin_headers(url, data_dir) == {"X-Quorum-Admin": token}, url
    for url in ("http://192.168.1.20:32768", "http://mybox:32768", "http://localhost.evil.example"):
        assert admin_headers(url, data_dir) == {}, url
    assert admin_headers("http://127.0.0.1:32768", tmp_path / "nothing") == {}


async def test_the_cli_edits_a_stopped_nodes_store_and_the_node_takes_it_up(start_node, fake, tmp_path, capsys) -> None:
    data_dir = str(tmp_path / "offline")
    offline = ["keys", "--url", "http://127.0.0.1:9", "--data-dir", data_dir]  # nothing listens on port 9
    code, out, _ = run_cli(capsys, *offline, "create", "--name", "server-app", "--models", "alpha")
    assert code == 0
    key = out.strip()
    code, out, _ = run_cli(capsys, *offline, "create", "--name", "gone")
    gone = out.strip()
    assert run_cli(capsys, *offline, "revoke", "gone")[0] == 0
    code, out, _ = run_cli(capsys, *offline, "list")
    assert "server-app" in out and "revoked" in out
    node = await keyed_node(start_node, fake, data_dir=data_dir, require_key=True)
    assert await chat(node, key)
    with pytest.raises(openai.AuthenticationError):
        await chat(node, gone)


async def test_keys_survive_a_restart(start_node, fake, tmp_path) -> None:
    data_dir = str(tmp_path / "n")
    node = await keyed_node(start_node, fake, data_dir=data_dir, require_key=True)
    _, key = node.keys.create("durable")
    _, revoked = node.keys.create("revoked")
    node.keys.revoke("revoked")
    assert await chat(node, key)
    await node.stop()
    again = await keyed_node(start_node, fake, data_dir=data_dir, require_key=True)
    assert await chat(again, key)
    with pytest.raises(openai.AuthenticationError):
        await chat(again, revoked)
    assert next(k for k in again.keys.list() if k.name == "durable").last_used is not None


async def test_a_damaged_store_stops_the_node_rather_than_forgetting_revocations(tmp_path) -> None:
    from quorum_node.errors import ConfigError
    from tests.conftest import node_settings

    settings = node_settings(tmp_path, 0)
    Path(settings.data_dir).mkdir(parents=True)
    (Path(settings.data_dir) / KEYS_FILE).write_text('{"records": [{"id": "k_1"')
    with pytest.raises(ConfigError, match="damaged"):
        Node(settings)


async def test_peer_endpoints_for_keys_need_a_signature(start_node, fake, http: aiohttp.ClientSession) -> None:
    node = await keyed_node(start_node, fake, cluster="t", cluster_secret="s3cret")
    for method in ("GET", "POST"):
        async with http.request(method, node.url + "/quorum/v1/keys", json={"records": []}) as resp:
            assert resp.status == 401
