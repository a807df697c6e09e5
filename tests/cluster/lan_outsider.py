"""An outsider on the LAN, for tests/cluster/test_trust_lan.py: its own keys, no member of the cluster, and hostile.

Run in a namespace with ``ip netns exec``::

    python -m tests.cluster.lan_outsider --ip 10.79.0.4 --data-dir DIR --name NAME --models a,b

It listens where a node would: plain HTTP on 0.0.0.0:32768, and a peer port on
0.0.0.0:32769 that records every TCP connection, then offers TLS with its own
certificate (``identity.py``: its own key pair, made in ``--data-dir``) and
serves whatever comes through it from the same app. Every answer is forged: a
health answer naming whoever it claims to be, a catalog listing ``--models``
(say, the members' models and a bait of its own), and chat answers reading
``FORGED_ANSWER``. It reports on stdout, one ``@@{...}`` line each:

    {"ready": {"node_id", "ip"}}               listening, not announced yet
    {"connection": {"remote"}}                 a TCP connection to its peer port
    {"handshake_failed": {"remote", "error"}}  ... whose TLS handshake did not complete
    {"tls": {"remote"}}                        ... whose TLS handshake completed
    {"request": {"port", "method", "path", "remote", "body"}}
                                               an HTTP request, on either port (``port``:
                                               "public" or "peer")

and obeys JSON lines on stdin, each answered with one message:

    {"announce": null}       announce itself on mDNS, as a node would (its own id)
                             → {"announced": {"instance", "txt"}}
    {"announce": NODE_ID}    copy the TXT record the member NODE_ID announces (read off the
                             wire) and announce it as its own, at its own address, under an
                             instance name of its own → {"announced": {...}}
    {"leave": true}          withdraw the announcement (mDNS goodbye) → {"left": true}
    {"push": "HOST:PORT"}    post membership records of a cluster it founded itself to that
                             peer port, with no certificate (the introduction's way in)
                             → {"pushed": {"status", "body"}}

zeroconf binds to ``--ip`` only. Logs go to stderr. It runs until SIGTERM or EOF on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from quorum_node.cluster.identity import NodeIdentity, load_or_create_identity
from quorum_node.cluster.mdns import SERVICE_TYPE
from quorum_node.cluster.members import MemberStore, encode_records

__all__ = ["FORGED_ANSWER"]

PORT = 32768
PEER_PORT = PORT + 1
FORGED_ANSWER = "FORGED by the outsider"
_PUBLIC = "public"
_PEER = "peer"


def say(**kw: Any) -> None:
    print("@@" + json.dumps(kw), flush=True)


class Outsider:
    def __init__(self, args: argparse.Namespace, identity: NodeIdentity) -> None:
        self.args = args
        self.identity = identity
        self.claim_id = identity.node_id  # who its health answers say it is
        self.models = [m for m in args.models.split(",") if m]
        self.internal_port = 0
        self.aiozc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.seen: set[str] = set()  # service names heard on mDNS
        self.info: AsyncServiceInfo | None = None
        self._tls: ssl.SSLContext | None = None

    # -- the forged node ------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        port = _PEER if sockname is not None and sockname[1] == self.internal_port else _PUBLIC
        say(
            request={
                "port": port,
                "method": request.method,
                "path": request.path_qs[:300],
                "remote": request.remote,
                "body": body[:300].decode(errors="replace"),
            }
        )
        path = request.path
        if path == "/quorum/v1/health":
            return web.json_response(
                {
                    "node_id": self.claim_id,
                    "name": self.args.name,
                    "cluster": self.claim_id,
                    "proto": 4,
                    "catalog_digest": "forged",
                    "port": PEER_PORT,
                    "keys_digest": "",
                    "members_digest": "",
                    "load": {"in_flight": 0, "engines": []},
                }
            )
        if path == "/quorum/v1/catalog":
            return web.json_response(
                {
                    "digest": "forged",
                    "models": [
                        {
                            "id": m,
                            "aliases": [],
                            "engine": "openai",
                            "context_length": None,
                            "loaded": True,
                            "owned_by": "outsider",
                            "created": 0,
                            "family": None,
                            "parameter_size": None,
                            "quantization": None,
                            "available": True,
                        }
                        for m in self.models
                    ],
                }
            )
        if path == "/v1/models":
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model", "created": 0, "owned_by": "outsider"} for m in self.models],
                }
            )
        if path == "/v1/chat/completions":
            try:
                wanted = json.loads(body or b"{}")
            except ValueError:
                wanted = {}
            model = wanted.get("model") or "bait"
            head = {"id": "chatcmpl-forged", "created": 0, "model": model}
            if wanted.get("stream"):
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                for delta, finish in (({"role": "assistant", "content": FORGED_ANSWER}, None), ({}, "stop")):
                    chunk = {
                        **head,
                        "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    }
                    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                return resp
            return web.json_response(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": FORGED_ANSWER},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        return web.json_response({"accepted": 0, "refused": 0})

    # -- the peer port: every connection recorded, then TLS with its own certificate ------

    def tls_server(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(self.identity.key_pem() + self.identity.cert_pem())
            f.flush()
            ctx.load_cert_chain(f.name)
        return ctx  # asks no client certificate: whoever completes a handshake is served

    async def peer_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = (writer.get_extra_info("peername") or ("?",))[0]
        say(connection={"remote": remote})
        try:
            try:
                async with asyncio.timeout(5.0):
                    assert self._tls is not None
                    await writer.start_tls(self._tls)
            except (ssl.SSLError, OSError, TimeoutError) as e:
                say(handshake_failed={"remote": remote, "error": f"{type(e).__name__}: {e}"})
                return
            say(tls={"remote": remote})
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.internal_port)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    # -- mDNS --------------------------------------------------------------------------------

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            self.seen.add(name)

    async def copied_txt(self, node_id: str, timeout_s: float = 10.0) -> dict[str, str]:
        """The TXT record the member ``node_id`` announces, as heard on the LAN."""
        assert self.aiozc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in sorted(self.seen):
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if await info.async_request(self.aiozc.zeroconf, 1000):
                    props = {k: v or "" for k, v in info.decoded_properties.items()}
                    if props.get("id") == node_id:
                        return props
            await asyncio.sleep(0.2)
        raise SystemExit(f"lan_outsider: nobody announces {node_id} on mDNS")

    async def announce(self, node_id: str | None) -> dict[str, Any]:
        assert self.aiozc is not None
        await self.leave()
        if node_id is None:
            txt = {
                "id": self.identity.node_id,
                "v": "4",
                "port": str(PEER_PORT),
                "cat": "forged",
                "name": self.args.name,
            }
        else:
            txt = await self.copied_txt(node_id)
        self.claim_id = txt["id"]
        instance = f"outsider-{self.identity.node_id[:12]}.{SERVICE_TYPE}"
        self.info = AsyncServiceInfo(
            SERVICE_TYPE,
            instance,
            port=PEER_PORT,
            properties=txt,
            server=f"outsider-{self.identity.node_id[:12]}.local.",
            addresses=[socket.inet_aton(self.args.ip)],
        )
        await (await self.aiozc.async_register_service(self.info))
        return {"instance": instance, "txt": txt}

    async def leave(self) -> None:
        if self.info is not None and self.aiozc is not None:
            info, self.info = self.info, None
            await (await self.aiozc.async_unregister_service(info))

    async def push(self, address: str) -> dict[str, Any]:
        """Records of a cluster of its own (itself the founder) to a member's peer port, no certificate."""
        store = MemberStore(self.identity.node_id)
        store.found(self.identity, self.args.name, time.time())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=10)
                ) as session,
                session.post(f"https://{address}/quorum/v1/members", data=encode_records(store.records())) as r,
            ):
                return {"status": r.status, "body": (await r.read()).decode(errors="replace")[:300]}
        except (aiohttp.ClientError, OSError) as e:
            return {"status": None, "body": f"{type(e).__name__}: {e}"}

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> int:
        self._tls = self.tls_server()
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        public = web.TCPSite(runner, "0.0.0.0", PORT)
        internal = web.TCPSite(runner, "127.0.0.1", 0)
        await public.start()
        await internal.start()
        self.internal_port = internal._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        front = await asyncio.start_server(self.peer_connection, "0.0.0.0", PEER_PORT)
        self.aiozc = AsyncZeroconf(interfaces=[self.args.ip], ip_version=IPVersion.V4Only)
        self.browser = AsyncServiceBrowser(self.aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        commands = asyncio.create_task(self.commands(stop.set), name="outsider-commands")
        say(ready={"node_id": self.identity.node_id, "ip": self.args.ip, "pid": os.getpid()})
        try:
            await stop.wait()
        finally:
            commands.cancel()
            await asyncio.gather(commands, return_exceptions=True)
            front.close()
            await front.wait_closed()
            with contextlib.suppress(Exception):
                await self.leave()
            await self.browser.async_cancel()
            await self.aiozc.async_close()
            await runner.cleanup()
        say(stopped=True)
        return 0

    async def commands(self, done: Any) -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while line := await reader.readline():
                cmd = json.loads(line)
                if "announce" in cmd:
                    say(announced=await self.announce(cmd["announce"]))
                elif "leave" in cmd:
                    await self.leave()
                    say(left=True)
                elif "push" in cmd:
                    say(pushed=await self.push(cmd["push"]))
                else:
                    raise SystemExit(f"lan_outsider: unknown command {cmd!r}")
        finally:
            transport.close()
            done()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ip", required=True, help="its LAN address (zeroconf binds to it only)")
    p.add_argument("--data-dir", required=True, help="where its own key pair is made")
    p.add_argument("--name", default="outsider")
    p.add_argument("--models", default="", help="comma-separated model ids its forged catalog lists")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    sys.exit(asyncio.run(Outsider(args, load_or_create_identity(Path(args.data_dir))).run()))
