"""A client for tests/cluster/test_lan.py and tests/cluster/test_wan.py, run inside a namespace with ``ip netns exec``.

It talks to the node of its own namespace at http://127.0.0.1:32768 (loopback:
trusted, no key) and prints one JSON line per event on stdout, flushed:

    models [--expect JSON] [--absent IDS] [--timeout S] [--holders]
                                            GET /v1/models; with --expect ({model: [nodes]}) and
                                            --absent (comma-separated ids), poll until those entries
                                            match and none of those ids is listed, or the time is up
                                            → {"status", "models": {id: nodes}, "elapsed_s"}
                                            (--holders: also "holders": {id: its "holders" as listed})
    chat MODEL [--stream] [--prompt TEXT] [--temperature T] [--max-tokens N] [--seed S]
                                            the real openai SDK (the user message: TEXT, default "hi";
                                            the sampling options are sent only when given)
                                            → {"event": "first_chunk"} (streams), then
                                              {"status", "node", "route", "content", "error", "done_seen": null}
    raw MODEL                               a streamed chat read as raw SSE with aiohttp
                                            → {"event": "first_chunk"}, then {"status", "node", "route",
                                              "content", "error", "done_seen", "ended_with_error"}
    cut MODEL                               ``chat --stream`` and ``raw`` side by side; one
                                            {"event": "first_chunk"} once both have content, then
                                            {"sdk": {...}, "raw": {...}}
    peer-get URL --data-dir DIR [--introduce]
                                            GET URL (a peer port, https) as the node whose keys are in
                                            DIR would: mutual TLS with its certificate, trusting any
                                            server; --introduce first posts DIR's membership records
                                            there, as a member the node has not heard of does
                                            → {"status" (None: no answer), "error", "body",
                                               "introduced": the answer's counts or its error}
    plain-get URL                           one plain-HTTP GET (bytes on the wire in the clear)
                                            → {"status", "error"}
    peers [--until-relay STATE] [--timeout S]
                                            GET /quorum/v1/peers (polled until ``relay.state`` is
                                            STATE) → the body plus "elapsed_s"
    connect HOST PORT [--timeout S]         one TCP connect → {"connected", "error", "elapsed_s"}
    tunnel URL                              a WebSocket upgrade of URL (a peer port's shard tunnel,
                                            https) with no client certificate, trusting any server
                                            → {"status" (the handshake's answer; 101: upgraded), "error"}
    replay HOST PORT FILE [--first N] [--timeout S]
                                            FILE's bytes sent raw on one TCP connection (a recorded
                                            stream played again; --first: its first N bytes alone, and
                                            the rest once their answer has come); what comes back until
                                            the server closes or S (5) seconds pass → {"sent",
                                            "first_answer" (base64: the answer to the first N),
                                            "received" (base64: all of it), "closed", "error"}
    poll-chat MODEL [--timeout S] [--go-on-stdin]
                                            a non-streamed chat through the openai SDK, again every
                                            0.1 s until one succeeds: {"event": "polling"} first, then
                                            {"ok", "at" (time.monotonic() of the success: one clock for
                                            every namespace), "attempts", "status", "node", "route",
                                            "content", "last_error"}; with --go-on-stdin it says
                                            {"event": "waiting"} once loaded and starts on a line on stdin
    watch MODEL [--interval S]              non-streamed chats through the openai SDK, one every S
                                            (0.1) seconds, until a line on stdin: {"event": "watching"}
                                            once the first has been answered, then {"results": [[at,
                                            status, node, content or error], ...]} (``at``: monotonic)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai

from quorum_node.cluster.identity import IDENTITY_FILE, load_or_create_identity
from tests.members_support import client_tls, records_of

BASE = "http://127.0.0.1:32768"
MESSAGES = [{"role": "user", "content": "hi"}]


def emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


def _result(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"status": None, "node": None, "route": None, "content": "", "error": None, "done_seen": None}
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


async def sdk_chat(model: str, stream: bool, first: FirstChunk, prompt: str = "hi", **sampling: Any) -> dict[str, Any]:
    """A chat through the openai SDK; tells ``first`` when content first arrives. ``sampling``: more
    request fields (temperature, max_tokens, seed), those that are not None."""
    async with openai.AsyncOpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0) as client:
        out = _result()
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                stream=stream,  # type: ignore[arg-type]
                **{k: v for k, v in sampling.items() if v is not None},
            )
            out.update(
                status=raw.status_code, node=raw.headers.get("X-Quorum-Node"), route=raw.headers.get("X-Quorum-Route")
            )
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
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(BASE + "/v1/chat/completions", json=body) as resp,
    ):
        out.update(status=resp.status, node=resp.headers.get("X-Quorum-Node"), route=resp.headers.get("X-Quorum-Route"))
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


async def models(
    expect: dict[str, list[str]] | None, timeout_s: float, absent: list[str] = (), holders: bool = False
) -> dict[str, Any]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(BASE + "/v1/models") as resp:
                status = resp.status
                body = await resp.json()
            listed = {m["id"]: m.get("nodes") for m in body.get("data") or ()}
            elapsed = time.monotonic() - t0
            done = (expect is None or all(listed.get(k) == v for k, v in expect.items())) and not any(
                k in listed for k in absent
            )
            if done or elapsed > timeout_s:
                out = {"status": status, "models": listed, "elapsed_s": round(elapsed, 3)}
                if holders:
                    out["holders"] = {m["id"]: m.get("holders") for m in body.get("data") or ()}
                return out
            await asyncio.sleep(0.1)


async def peer_get(url: str, data_dir: str, introduce: bool) -> dict[str, Any]:
    """GET a peer endpoint as the node whose keys are in ``data_dir`` would (mutual TLS, its certificate)."""
    if not (Path(data_dir) / IDENTITY_FILE).exists():
        raise SystemExit(f"lan_client: no node keys in {data_dir}")
    identity = load_or_create_identity(Path(data_dir))
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    out: dict[str, Any] = {"status": None, "error": None, "body": None, "introduced": None}
    timeout = aiohttp.ClientTimeout(total=10)
    if introduce:  # no certificate of its own: the introduction's way in (members_sync.py)
        intro = aiohttp.TCPConnector(ssl=client_tls(None, None))
        try:
            async with (
                aiohttp.ClientSession(connector=intro, timeout=timeout) as session,
                session.post(base + "/quorum/v1/members", data=records_of(Path(data_dir))) as resp,
            ):
                out["introduced"] = {"status": resp.status, "body": (await resp.read()).decode(errors="replace")}
        except (aiohttp.ClientError, OSError, ssl.SSLError) as e:
            out["introduced"] = {"status": None, "body": f"{type(e).__name__}: {e}"}
    connector = aiohttp.TCPConnector(ssl=client_tls(identity, None), force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            out.update(status=resp.status, body=(await resp.read()).decode(errors="replace")[:500])
    except (aiohttp.ClientError, OSError, ssl.SSLError) as e:  # a handshake the server refused, mostly
        out["error"] = f"{type(e).__name__}: {e}"
    return out


async def plain_get(url: str) -> dict[str, Any]:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            await resp.read()
            return {"status": resp.status, "error": None}
    except (aiohttp.ClientError, OSError) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}


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


async def tunnel(url: str) -> dict[str, Any]:
    """A shard tunnel's WebSocket upgrade as a stranger asks for it: TLS with no certificate of its own."""
    connector = aiohttp.TCPConnector(ssl=client_tls(None, None), force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.ws_connect(url) as ws,
        ):
            return {"status": 101, "error": None, "protocol": ws.protocol}
    except aiohttp.WSServerHandshakeError as e:
        return {"status": e.status, "error": f"{type(e).__name__}: {e.message}"}
    except (aiohttp.ClientError, OSError, ssl.SSLError) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}


async def replay(host: str, port: int, data: bytes, first: int, timeout_s: float) -> dict[str, Any]:
    """Send ``data`` raw on one connection to ``host:port``; what comes back until it closes or time is up.
    ``first`` > 0: its first ``first`` bytes alone, then what they are answered with (until 1 s passes with
    nothing more, or the server closes), then the rest."""
    out: dict[str, Any] = {"sent": 0, "first_answer": "", "received": "", "closed": False, "error": None}
    got = bytearray()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def send(part: bytes) -> None:
        try:
            writer.write(part)
            await writer.drain()
            out["sent"] += len(part)
        except OSError as e:  # the server hung up before it had read it all
            out["error"] = out["error"] or f"send: {type(e).__name__}: {e}"

    sending: asyncio.Task[None] | None = None
    try:
        if first > 0:
            await send(data[:first])
            while loop.time() < deadline:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), min(1.0, deadline - loop.time()))
                except TimeoutError:
                    break  # answered (or not) and quiet: the rest goes
                if not chunk:
                    out["closed"] = True
                    break
                got += chunk
            out["first_answer"] = base64.b64encode(bytes(got)).decode()
        if not out["closed"]:
            sending = asyncio.create_task(send(data[first:]))
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                while chunk := await reader.read(65536):
                    got += chunk
                out["closed"] = True
    except TimeoutError:
        pass
    except OSError as e:
        out["closed"] = True
        out["error"] = out["error"] or f"receive: {type(e).__name__}: {e}"
    finally:
        if sending is not None:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    out["received"] = base64.b64encode(bytes(got)).decode()
    return out


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
                return {
                    "ok": True,
                    "at": time.monotonic(),
                    "attempts": attempts,
                    "status": raw.status_code,
                    "node": raw.headers.get("X-Quorum-Node"),
                    "route": raw.headers.get("X-Quorum-Route"),
                    "content": raw.parse().choices[0].message.content,
                    "last_error": last_error,
                }
            except openai.APIError as e:
                last_error = f"{type(e).__name__}: {e.message}"
            if time.monotonic() - t0 > timeout_s:
                return {"ok": False, "at": time.monotonic(), "attempts": attempts, "last_error": last_error}
            await asyncio.sleep(0.1)


async def watch(model: str, interval_s: float) -> dict[str, Any]:
    results: list[list[Any]] = []
    stop = asyncio.ensure_future(_stdin_line())
    try:
        async with openai.AsyncOpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=3.0) as client:
            while not stop.done():
                t0 = time.monotonic()
                try:
                    raw = await client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
                    results.append(
                        [
                            time.monotonic(),
                            raw.status_code,
                            raw.headers.get("X-Quorum-Node"),
                            raw.parse().choices[0].message.content,
                        ]
                    )
                except openai.APIStatusError as e:
                    results.append(
                        [time.monotonic(), e.status_code, e.response.headers.get("X-Quorum-Node"), e.message]
                    )
                except openai.APIError as e:
                    results.append([time.monotonic(), None, None, f"{type(e).__name__}: {e.message}"])
                if len(results) == 1:
                    emit(event="watching")
                await asyncio.wait([stop], timeout=max(0.0, interval_s - (time.monotonic() - t0)))
    finally:
        stop.cancel()
        await asyncio.gather(stop, return_exceptions=True)
    return {"results": results}


async def main(args: argparse.Namespace) -> int:
    if args.mode == "peers":
        emit(**await peers(args.until_relay, args.timeout))
    elif args.mode == "connect":
        emit(**connect(args.host, args.port, args.timeout))
    elif args.mode == "tunnel":
        emit(**await tunnel(args.url))
    elif args.mode == "replay":
        emit(**await replay(args.host, args.port, Path(args.file).read_bytes(), args.first, args.timeout))
    elif args.mode == "poll-chat":
        emit(**await poll_chat(args.model, args.timeout, args.go_on_stdin))
    elif args.mode == "models":
        emit(
            **await models(
                json.loads(args.expect) if args.expect else None,
                args.timeout,
                [m for m in args.absent.split(",") if m],
                args.holders,
            )
        )
    elif args.mode == "peer-get":
        emit(**await peer_get(args.url, args.data_dir, args.introduce))
    elif args.mode == "plain-get":
        emit(**await plain_get(args.url))
    elif args.mode == "watch":
        emit(**await watch(args.model, args.interval))
    elif args.mode == "chat":
        emit(
            **await sdk_chat(
                args.model,
                args.stream,
                FirstChunk("sdk"),
                args.prompt,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                seed=args.seed,
            )
        )
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
    m.add_argument("--absent", default="")
    m.add_argument("--timeout", type=float, default=0.0)
    m.add_argument("--holders", action="store_true")
    c = sub.add_parser("chat")
    c.add_argument("model")
    c.add_argument("--stream", action="store_true")
    c.add_argument("--prompt", default="hi")
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    sub.add_parser("raw").add_argument("model")
    sub.add_parser("cut").add_argument("model")
    g = sub.add_parser("peer-get")
    g.add_argument("url")
    g.add_argument("--data-dir", required=True)
    g.add_argument("--introduce", action="store_true")
    sub.add_parser("plain-get").add_argument("url")
    w = sub.add_parser("watch")
    w.add_argument("model")
    w.add_argument("--interval", type=float, default=0.1)
    pe = sub.add_parser("peers")
    pe.add_argument("--until-relay", default="")
    pe.add_argument("--timeout", type=float, default=0.0)
    cn = sub.add_parser("connect")
    cn.add_argument("host")
    cn.add_argument("port", type=int)
    cn.add_argument("--timeout", type=float, default=2.0)
    sub.add_parser("tunnel").add_argument("url")
    rp = sub.add_parser("replay")
    rp.add_argument("host")
    rp.add_argument("port", type=int)
    rp.add_argument("file")
    rp.add_argument("--first", type=int, default=0)
    rp.add_argument("--timeout", type=float, default=5.0)
    pc = sub.add_parser("poll-chat")
    pc.add_argument("model")
    pc.add_argument("--timeout", type=float, default=10.0)
    pc.add_argument("--go-on-stdin", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
