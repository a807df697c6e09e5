"""A client for tests/test_lan.py and tests/test_wan.py, run inside a namespace with ``ip netns exec``.

It talks to the node of its own namespace at http://127.0.0.1:32768 (loopback:
trusted, no key) and prints one JSON line per event on stdout, flushed:

    models [--expect JSON] [--timeout S]    GET /v1/models; with --expect ({model: [nodes]}),
                                            poll until those entries match or the time is up
                                            → {"status", "models": {id: nodes}, "elapsed_s"}
    chat MODEL [--stream]                   the real openai SDK
                                            → {"event": "first_chunk"} (streams), then
                                              {"status", "node", "route", "content", "error", "done_seen": null}
    raw MODEL                               a streamed chat read as raw SSE with aiohttp
                                            → {"event": "first_chunk"}, then {"status", "node", "route",
                                              "content", "error", "done_seen", "ended_with_error"}
    cut MODEL                               ``chat --stream`` and ``raw`` side by side; one
                                            {"event": "first_chunk"} once both have content, then
                                            {"sdk": {...}, "raw": {...}}
    signed-get URL SECRET                   GET URL signed with the cluster key of SECRET
                                            → {"status"}
    peers [--until-relay STATE] [--timeout S]
                                            GET /quorum/v1/peers (polled until ``relay.state`` is
                                            STATE) → the body plus "elapsed_s"
    connect HOST PORT [--timeout S]         one TCP connect → {"connected", "error", "elapsed_s"}
    poll-chat MODEL [--timeout S] [--go-on-stdin]
                                            a non-streamed chat through the openai SDK, again every
                                            0.1 s until one succeeds: {"event": "polling"} first, then
                                            {"ok", "at" (time.monotonic() of the success: one clock for
                                            every namespace), "attempts", "status", "node", "route",
                                            "content", "last_error"}; with --go-on-stdin it says
                                            {"event": "waiting"} once loaded and starts on a line on stdin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai

from quorum_node.cluster.signing import derive_keys, sign

BASE = "http://127.0.0.1:32768"
MESSAGES = [{"role": "user", "content": "hi"}]


def emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


def _result(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"status": None, "node": None, "route": None, "content": "", "error": None,
                           "done_seen": None}
    out.update(kw)
    return out


class FirstChunk:
    """Prints ``{"event": "first_chunk"}`` once every one of ``sources`` has reported content."""

    def __init__(self, *sources: str) -> None:
        self.waiting = set(sources)

    def seen(self, source: str) -> None:
        if self.waiting:
            self.waiting.discard(source)
            if not self.waiting:
                emit(event="first_chunk")


async def sdk_chat(model: str, stream: bool, first: FirstChunk) -> dict[str, Any]:
    """A chat through the openai SDK; tells ``first`` when content first arrives."""
    async with openai.AsyncOpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0) as client:
        out = _result()
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, stream=stream  # type: ignore[arg-type]
            )
            out.update(status=raw.status_code, node=raw.headers.get("X-Quorum-Node"),
                       route=raw.headers.get("X-Quorum-Route"))
            parsed = raw.parse()
            if not stream:
                out["content"] = parsed.choices[0].message.content
                return out
            parts: list[str] = []
            async for chunk in parsed:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    parts.append(text)
                    out["content"] = "".join(parts)
                    first.seen("sdk")
        except openai.APIStatusError as e:
            out.update(status=e.status_code, error=f"{type(e).__name__}: {e.message}")
        except openai.APIError as e:  # an error event inside a 200 stream, a broken connection …
            out["error"] = f"{type(e).__name__}: {e.message}"
        return out


async def raw_chat(model: str, first: FirstChunk) -> dict[str, Any]:
    """A streamed chat read byte for byte: what the last event was, and whether [DONE] came."""
    body = {"model": model, "messages": MESSAGES, "stream": True}
    out = _result(done_seen=False, ended_with_error=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(BASE + "/v1/chat/completions", json=body) as resp:
            out.update(status=resp.status, node=resp.headers.get("X-Quorum-Node"),
                       route=resp.headers.get("X-Quorum-Route"))
            last_data = ""
            parts: list[str] = []
            try:
                async for line in resp.content:
                    text = line.decode().rstrip("\r\n")
                    if not text.startswith("data:"):
                        continue
                    data = text[5:].strip()
                    last_data = data
                    if data == "[DONE]":
                        out["done_seen"] = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        out["error"] = event["error"]
                        continue
                    for choice in event.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            parts.append(piece)
                            out["content"] = "".join(parts)
                            first.seen("raw")
            except aiohttp.ClientError as e:
                out["transport_error"] = f"{type(e).__name__}: {e}"
            out["ended_with_error"] = last_data.startswith('{"error"')
    return out


async def models(expect: dict[str, list[str]] | None, timeout_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(BASE + "/v1/models") as resp:
                status = resp.status
                body = await resp.json()
            listed = {m["id"]: m.get("nodes") for m in body.get("data") or ()}
            elapsed = time.monotonic() - t0
            done = expect is None or all(listed.get(k) == v for k, v in expect.items())
            if done or elapsed > timeout_s:
                return {"status": status, "models": listed, "elapsed_s": round(elapsed, 3)}
            await asyncio.sleep(0.1)


async def signed_get(url: str, secret: str) -> dict[str, Any]:
    """GET a peer endpoint as a cluster member would: learn the node's id from /health, then sign for it."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    keys = derive_keys(secret.encode())
    base = f"{parts.scheme}://{parts.netloc}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        probe = sign(keys, method="GET", path="/quorum/v1/health", body=b"", node_id="lan-client", to="*",
                     now=time.time())
        async with session.get(base + "/quorum/v1/health", headers=probe, allow_redirects=False) as resp:
            if resp.status != 200:
                return {"status": resp.status, "body": (await resp.read()).decode(errors="replace")[:500]}
            to = (await resp.json())["node_id"]
        headers = sign(keys, method="GET", path=path, body=b"", node_id="lan-client", to=to, now=time.time())
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            return {"status": resp.status, "body": (await resp.read()).decode(errors="replace")[:500]}


async def peers(until_relay: str, timeout_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            async with session.get(BASE + "/quorum/v1/peers") as resp:
                body = await resp.json()
            elapsed = time.monotonic() - t0
            state = (body.get("relay") or {}).get("state")
            if not until_relay or state == until_relay or elapsed > timeout_s:
                body["elapsed_s"] = round(elapsed, 3)
                return body
            await asyncio.sleep(0.05)


def connect(host: str, port: int, timeout_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return {"connected": True, "error": None, "elapsed_s": round(time.monotonic() - t0, 3)}
    except OSError as e:
        return {"connected": False, "error": f"{type(e).__name__}: {e}", "elapsed_s": round(time.monotonic() - t0, 3)}


async def _stdin_line() -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        return await reader.readline()
    finally:
        transport.close()


async def poll_chat(model: str, timeout_s: float, go_on_stdin: bool) -> dict[str, Any]:
    attempts = 0
    last_error = None
    async with openai.AsyncOpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=3.0) as client:
        if go_on_stdin:  # loaded (the SDK import is the slow part), so polling starts the moment it is told
            emit(event="waiting")
            await _stdin_line()
        emit(event="polling")
        t0 = time.monotonic()
        while True:
            attempts += 1
            try:
                raw = await client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
                return {"ok": True, "at": time.monotonic(), "attempts": attempts, "status": raw.status_code,
                        "node": raw.headers.get("X-Quorum-Node"), "route": raw.headers.get("X-Quorum-Route"),
                        "content": raw.parse().choices[0].message.content, "last_error": last_error}
            except openai.APIError as e:
                last_error = f"{type(e).__name__}: {e.message}"
            if time.monotonic() - t0 > timeout_s:
                return {"ok": False, "at": time.monotonic(), "attempts": attempts, "last_error": last_error}
            await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> int:
    if args.mode == "peers":
        emit(**await peers(args.until_relay, args.timeout))
    elif args.mode == "connect":
        emit(**connect(args.host, args.port, args.timeout))
    elif args.mode == "poll-chat":
        emit(**await poll_chat(args.model, args.timeout, args.go_on_stdin))
    elif args.mode == "models":
        emit(**await models(json.loads(args.expect) if args.expect else None, args.timeout))
    elif args.mode == "signed-get":
        emit(**await signed_get(args.url, args.secret))
    elif args.mode == "chat":
        emit(**await sdk_chat(args.model, args.stream, FirstChunk("sdk")))
    elif args.mode == "raw":
        emit(**await raw_chat(args.model, FirstChunk("raw")))
    else:  # cut
        first = FirstChunk("sdk", "raw")
        sdk, raw = await asyncio.gather(sdk_chat(args.model, True, first), raw_chat(args.model, first))
        emit(sdk=sdk, raw=raw)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("models")
    m.add_argument("--expect", default="")
    m.add_argument("--timeout", type=float, default=0.0)
    c = sub.add_parser("chat")
    c.add_argument("model")
    c.add_argument("--stream", action="store_true")
    sub.add_parser("raw").add_argument("model")
    sub.add_parser("cut").add_argument("model")
    g = sub.add_parser("signed-get")
    g.add_argument("url")
    g.add_argument("secret")
    pe = sub.add_parser("peers")
    pe.add_argument("--until-relay", default="")
    pe.add_argument("--timeout", type=float, default=0.0)
    cn = sub.add_parser("connect")
    cn.add_argument("host")
    cn.add_argument("port", type=int)
    cn.add_argument("--timeout", type=float, default=2.0)
    pc = sub.add_parser("poll-chat")
    pc.add_argument("model")
    pc.add_argument("--timeout", type=float, default=10.0)
    pc.add_argument("--go-on-stdin", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
