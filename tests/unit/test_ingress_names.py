"""Names from outside (a peer's health answer, its catalog, its mDNS TXT record, an answer's header) are
checked where they enter: a name that could break a response header or a log line never gets in.

Fed directly: the decoders and the TXT parser are pure.
"""

from __future__ import annotations

import json

import msgspec
import pytest
import structlog

from quorum_node.cluster.mdns import SERVICE_TYPE, peer_info_from_txt
from quorum_node.cluster.messages import decode_catalog, decode_identity
from quorum_node.names import safe_name

HOSTILE = ["den\r\nX-Injected: 1", "den\n", "\r", "den\x00", "den\x7f", "d" * 65, "den\tx"]


def _identity(name: str) -> bytes:
    return json.dumps({"node_id": "abc123", "name": name, "proto": 2}).encode()


@pytest.mark.parametrize("name", HOSTILE)
def test_an_identity_whose_name_could_break_a_header_is_refused(name: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_identity(_identity(name))


def test_printable_names_and_no_name_are_accepted() -> None:
    for name in ("den", "", "Ünïcode box ☃", "d" * 64):
        assert decode_identity(_identity(name)).name == name
    with pytest.raises(msgspec.ValidationError):  # node ids are tokens
        decode_identity(json.dumps({"node_id": "a\r\nb"}).encode())
    with pytest.raises(msgspec.ValidationError):  # the engines a peer reports, by name
        decode_identity(json.dumps({"node_id": "abc", "load": {"engines": [{"name": "x\ny"}]}}).encode())


def _txt(**over: str | None) -> dict[str, str | None]:
    return {"id": "abc123", "fp": "f" * 16, "v": "2", "port": "32768", "cat": "0" * 16, "name": "den", **over}


def test_mdns_txt_with_a_hostile_name_or_id_is_rejected() -> None:
    service = f"abc123.{SERVICE_TYPE}"
    ok = peer_info_from_txt(_txt(), service, "10.0.0.2:32768")
    assert ok is not None and (ok.node_id, ok.name, ok.address) == ("abc123", "den", "10.0.0.2:32768")
    assert peer_info_from_txt(_txt(name=None), service, "10.0.0.2:32768") is not None  # no name: the id shows
    with structlog.testing.capture_logs() as logs:
        for name in HOSTILE:
            assert peer_info_from_txt(_txt(name=name), service, "10.0.0.2:32768") is None
        assert peer_info_from_txt(_txt(id="abc\r\n123"), service, "10.0.0.2:32768") is None
    assert [e["event"] for e in logs] == ["mdns_peer_rejected"] * (len(HOSTILE) + 1)


def test_a_peers_catalog_keeps_its_first_models_up_to_the_cap_and_drops_bad_entries_alone() -> None:
    models = [{"id": f"m{i}", "aliases": [f"a{i}"]} for i in range(5000)]
    models[1] = {"id": "bad\r\nname"}
    models[2] = {"id": "ok", "aliases": ["x\ny"]}
    raw = json.dumps({"digest": "d1", "models": models}).encode()
    with structlog.testing.capture_logs() as logs:
        answer = decode_catalog(raw, max_models=100, peer="node-b")
    assert answer.digest == "d1"
    assert [m.id for m in answer.models] == ["m0", *(f"m{i}" for i in range(3, 100))]  # the bad ones alone dropped
    assert [e for e in logs if e["event"] == "peer_catalog_capped"] == [
        {"event": "peer_catalog_capped", "log_level": "warning", "peer": "node-b", "offered": 5000, "kept": 100}
    ]
    assert len(decode_catalog(raw).models) == 4096 - 2  # the default cap (max_models_per_peer)
    with pytest.raises(msgspec.ValidationError):
        decode_catalog(b'{"models": 5}')


def test_safe_name_lets_only_printable_bounded_names_into_a_header() -> None:
    assert safe_name("den", "peer-id") == "den"
    for hostile in [*HOSTILE, ""]:
        assert safe_name(hostile, "peer-id") == "peer-id"


def test_this_nodes_own_names_are_held_to_the_same_rule() -> None:
    from quorum_node.errors import ConfigError
    from quorum_node.settings import load_settings

    with pytest.raises(ConfigError, match="name"):
        load_settings({"name": "den\r\nX-Injected: 1"}, env={})
    with pytest.raises(ConfigError, match="backend name"):
        load_settings({"backends": [{"kind": "vllm", "url": "http://127.0.0.1:8000", "name": "gpu\n"}]}, env={})
    assert load_settings({"name": "den"}, env={}).name == "den"
