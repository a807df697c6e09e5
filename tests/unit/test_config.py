"""Settings: CLI > environment > config file > default, and bad config fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quorum_node.errors import ConfigError
from quorum_node.settings import BackendSpec, Settings, load_settings

QN = [str(Path(sys.executable).with_name("quorum-node"))]


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "quorum.toml"
    p.write_text(text)
    return str(p)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    env.update(extra)
    return env


# ------------------------------------------------------------------ precedence


def test_defaults() -> None:
    s = load_settings({}, env={})
    assert (s.host, s.port, s.detect, s.backends) == ("0.0.0.0", 32768, True, ())
    assert s.name  # the hostname
    assert s.data_dir.endswith("quorum") and "~" not in s.data_dir


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'port = 1111\nname = "from-file"\nidle_timeout_s = 5.0\nhost = "127.0.0.1"\n')
    env = {"QUORUM_PORT": "2222", "QUORUM_NAME": "from-env"}

    s = load_settings({}, env={}, config_file=cfg)
    assert (s.port, s.name, s.idle_timeout_s) == (1111, "from-file", 5.0)
    s = load_settings({}, env=env, config_file=cfg)
    assert (s.port, s.name, s.idle_timeout_s, s.host) == (2222, "from-env", 5.0, "127.0.0.1")
    s = load_settings({"port": 3333}, env=env, config_file=cfg)
    assert (s.port, s.name) == (3333, "from-env")
    assert s.first_token_timeout_s == Settings().first_token_timeout_s  # untouched: default


def test_config_file_from_env_and_from_cli(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'name = "filed"\n')
    assert load_settings({}, env={"QUORUM_CONFIG": cfg}).name == "filed"
    assert load_settings({"config": cfg}, env={}).name == "filed"


def test_env_values_are_typed() -> None:
    s = load_settings(
        {},
        env={
            "QUORUM_DETECT": "no",
            "QUORUM_MDNS": "off",
            "QUORUM_IDLE_TIMEOUT_S": "2.5",
            "QUORUM_MAX_BODY_BYTES": "1024",
            "QUORUM_DETECT_PORTS": "8080, 11434",
            "QUORUM_PEERS": "10.0.0.2:32768,box.lan:32768",
        },
    )
    assert s.detect is False and s.mdns is False
    assert s.idle_timeout_s == 2.5 and s.max_body_bytes == 1024
    assert s.detect_ports == (8080, 11434)
    assert s.peers == ("10.0.0.2:32768", "box.lan:32768")


def test_toml_backends_with_api_key(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
[[backends]]
kind = "vllm"
url = "http://127.0.0.1:8000/v1"
api_key = "sk-local-123"

[[backends]]
kind = "ollama"
url = "http://127.0.0.1:11434"
name = "big-box"
""",
    )
    s = load_settings({}, env={}, config_file=cfg)
    assert s.backends == (
        BackendSpec(kind="vllm", url="http://127.0.0.1:8000/v1", api_key="sk-local-123"),
        BackendSpec(kind="ollama", url="http://127.0.0.1:11434", name="big-box"),
    )
    assert "sk-local-123" not in repr(s) and "sk-local-123" not in repr(s.backends[0])


def test_quorum_backends_env_in_both_forms() -> None:
    short = load_settings({}, env={"QUORUM_BACKENDS": "ollama=http://127.0.0.1:11434, vllm=http://127.0.0.1:8000"})
    assert [(b.kind, b.url) for b in short.backends] == [
        ("ollama", "http://127.0.0.1:11434"),
        ("vllm", "http://127.0.0.1:8000"),
    ]
    as_json = json.dumps(
        [
            {"kind": "tgi", "url": "http://127.0.0.1:3000", "api_key": "hf_x"},
            {"kind": "llamacpp", "url": "http://127.0.0.1:8080"},
        ]
    )
    s = load_settings({}, env={"QUORUM_BACKENDS": as_json})
    assert [(b.kind, b.url, b.api_key) for b in s.backends] == [
        ("tgi", "http://127.0.0.1:3000", "hf_x"),
        ("llamacpp", "http://127.0.0.1:8080", None),
    ]


def test_cli_backends_replace_env_backends() -> None:
    s = load_settings(
        {"backends": [BackendSpec(kind="mlx", url="http://127.0.0.1:8080")]},
        env={"QUORUM_BACKENDS": "ollama=http://127.0.0.1:11434"},
    )
    assert [b.kind for b in s.backends] == ["mlx"]


def test_settings_are_frozen() -> None:
    s = load_settings({}, env={})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


# ---------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("prot = 8000\n", ["prot"]),  # a typo is not silently ignored
        ('[[backends]]\nkind = "ollama"\nurl = "http://127.0.0.1:11434"\napi_kee = "x"\n', ["api_kee"]),
        ('[[backends]]\nkind = "gpt4all"\nurl = "http://127.0.0.1:4891"\n', ["gpt4all", "ollama"]),
        ('[[backends]]\nkind = "ollama"\nurl = "127.0.0.1:11434"\n', ["bad URL", "127.0.0.1:11434"]),
        ('[[backends]]\nkind = "ollama"\nurl = "http://127.0.0.1:notaport"\n', ["port"]),
        ('[[backends]]\nkind = "ollama"\nurl = "ftp://127.0.0.1:11434"\n', ["bad URL"]),
        ('port = "many"\n', ["port"]),
        ("port = 70000\n", ["70000"]),
        ("detect_ports = [0]\n", ["detect_ports"]),
        ('peers = ["no-port"]\n', ["no-port"]),
        ("idle_timeout_s = 0\n", ["idle_timeout_s"]),
        ('cluster = "home"\n', ["cluster_secret"]),
        ("port = \n", ["quorum.toml"]),  # TOML syntax error names the file
    ],
)
def test_bad_config_file_is_a_config_error(tmp_path: Path, toml: str, words: list[str]) -> None:
    cfg = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_settings({}, env={}, config_file=cfg)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"QUORUM_PORT": "abc"}, ["port", "abc"]),
        ({"QUORUM_DETECT": "maybe"}, ["detect", "maybe"]),
        ({"QUORUM_BACKENDS": "ollama"}, ["KIND=URL"]),
        ({"QUORUM_BACKENDS": "[{broken"}, ["QUORUM_BACKENDS", "JSON"]),
        ({"QUORUM_BACKENDS": "foo=http://127.0.0.1:1"}, ["foo"]),
    ],
)
def test_bad_env_is_a_config_error(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, env=env)
    for w in words:
        assert w in str(info.value)


def test_queue_and_affinity_settings_default_and_come_from_env() -> None:
    s = load_settings({}, env={})
    assert (s.queue_max, s.queue_timeout_s, s.holder_concurrency) == (256, 30.0, 0)
    assert (s.affinity, s.affinity_load_bound) == (True, 1.0)
    s = load_settings(
        {},
        env={
            "QUORUM_QUEUE_MAX": "0",
            "QUORUM_QUEUE_TIMEOUT_S": "2.5",
            "QUORUM_HOLDER_CONCURRENCY": "1",
            "QUORUM_AFFINITY": "false",
            "QUORUM_AFFINITY_LOAD_BOUND": "1",
        },
    )
    assert (s.queue_max, s.queue_timeout_s, s.holder_concurrency, s.affinity, s.affinity_load_bound) == (
        0,
        2.5,
        1,
        False,
        1.0,
    )


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("queue_max = -1\n", ["queue_max", "-1"]),
        ("queue_timeout_s = 0\n", ["queue_timeout_s", "positive"]),
        ("queue_timeout_s = nan\n", ["queue_timeout_s"]),
        ("holder_concurrency = -1\n", ["holder_concurrency", "0 (no limit)"]),
        ("affinity_load_bound = 0.9\n", ["affinity_load_bound", "1.0"]),
        ('affinity = "sometimes"\n', ["affinity"]),
    ],
)
def test_bad_queue_and_affinity_settings_are_config_errors(tmp_path: Path, toml: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, env={}, config_file=write(tmp_path, toml))
    for w in words:
        assert w in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings({}, env={}, config_file=str(tmp_path / "absent.toml"))


@pytest.mark.parametrize(
    "args",
    [
        ["--backend", "foo=http://x"],
        ["--backend", "ollama=not-a-url"],
        ["--port", "99999"],
    ],
)
def test_run_with_bad_config_exits_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    r = subprocess.run(
        [*QN, "run", "--no-detect", "--no-mdns", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quorum-node: "), r.stderr
    assert "Traceback" not in r.stderr


def test_run_with_bad_config_file_exits_2(tmp_path: Path) -> None:
    cfg = write(tmp_path, "prot = 1\n")
    r = subprocess.run([*QN, "run", "--config", cfg], capture_output=True, text=True, timeout=30, env=clean_env())
    assert r.returncode == 2 and "prot" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_model_aliases_come_from_toml_and_env_and_bad_ones_are_refused() -> None:
    s = load_settings({"model_aliases": {"assistant": "llama3.2:3b-instruct"}}, env={})
    assert s.model_aliases == {"assistant": "llama3.2:3b-instruct"}
    s = load_settings({}, env={"QUORUM_MODEL_ALIASES": "assistant=llama3.2:3b-instruct, coder=qwen2.5-coder:7b"})
    assert s.model_aliases == {"assistant": "llama3.2:3b-instruct", "coder": "qwen2.5-coder:7b"}
    for env in ("assistant", "=x", "a=a"):
        with pytest.raises(ConfigError):
            load_settings({}, env={"QUORUM_MODEL_ALIASES": env})
