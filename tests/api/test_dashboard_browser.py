"""The dashboard in a real headless browser: Debian's chromium, driven by Selenium through chromedriver.

A cluster of three in-process nodes on 127.0.0.1 (static peers, fake engines)
serves the page; the browser loads it from the first node and must show every
node and model, a request made with the openai SDK while it is in flight and
when it ended (without a reload), a key created in the page, and no console
error. The run leaves a screenshot at ``artifacts/dashboard.png``.

Needs ``chromium`` and ``chromium-driver`` (``scripts/test`` installs them);
skipped, saying so, only where the browser cannot run at all.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from quorum_node.node import Node
from tests.conftest import StartFake, StartNode
from tests.support import eventually

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CLUSTER = {"cluster": "browser", "cluster_secret": "browser-secret"}
MESSAGES = [{"role": "user", "content": "hi"}]
WAIT_S = 15.0

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


def _browser_unavailable() -> str | None:
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install {pkg}, or run scripts/test)"
    return None


class Browser:
    """One headless chromium; every call blocks, so tests run them in a thread."""

    def __init__(self, profile: str) -> None:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1400,2000",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
        ):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        self.driver.set_page_load_timeout(WAIT_S)
        self.console: list[dict[str, Any]] = []

    def logs(self) -> list[dict[str, Any]]:
        self.console += self.driver.get_log("browser")
        return self.console

    def errors(self, allow: Callable[[str], bool] = lambda m: False) -> list[str]:
        return [e["message"] for e in self.logs() if e["level"] == "SEVERE" and not allow(e["message"])]

    def wait(self, check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result = check()
            except WebDriverException:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s} s in the browser: {what}; console: {self.logs()}")
            time.sleep(0.05)

    def texts(self, css: str) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css)]

    def attrs(self, css: str, name: str) -> list[str]:
        return [e.get_attribute(name) or "" for e in self.driver.find_elements(By.CSS_SELECTOR, css)]

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    reason = _browser_unavailable()
    if reason:
        pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="quorum-chromium-")
    try:
        b = await asyncio.to_thread(Browser, profile)
    except WebDriverException as e:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium could not start headless here: {e.msg}")
    try:
        yield b
    finally:
        await asyncio.to_thread(b.close)
        shutil.rmtree(profile, ignore_errors=True)


async def cluster(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, **overrides: Any
) -> tuple[list[Node], list[Any]]:
    held = {"north": ["alpha-model"], "south": ["beta-model", "shared-model"], "east": ["shared-model", "gamma-embed"]}
    nodes, engines = [], []
    for name, models in held.items():
        eng = await fake("openai", models=models)
        nodes.append(await start_node(name=name, backends=[{"kind": "openai", "url": eng.url}], **CLUSTER, **overrides))
        engines.append(eng)
    for n in nodes:
        assert n.cluster is not None
        for other in nodes:
            if other is not n:
                n.cluster.table.add_static(f"127.0.0.1:{other.peer_port}")

    async def converged() -> bool:  # (the fleet, not /v1/models: those would be requests in the page's list)
        async with http.get(nodes[0].url + "/quorum/admin/fleet") as resp:
            body = await resp.json()
        return {m["id"] for m in body["models"]} == {"alpha-model", "beta-model", "shared-model", "gamma-embed"}

    await eventually(converged, timeout_s=10, what="north sees every model of the cluster")
    return nodes, engines


async def test_dashboard_shows_the_cluster_and_updates_live(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, client_for: Any, browser: Browser
) -> None:
    nodes, engines = await cluster(start_node, fake, http)
    north = nodes[0]
    b = browser
    await asyncio.to_thread(b.driver.get, north.url + "/dashboard")

    def fleet_shown() -> bool:
        rows = b.attrs("#fleet tbody tr", "data-node")
        states = b.texts("#fleet tbody tr td:nth-child(2)")
        return sorted(rows) == ["east", "north", "south"] and states == ["online"] * 3

    await asyncio.to_thread(b.wait, fleet_shown, "the three nodes, online")
    models = await asyncio.to_thread(b.attrs, "#models tbody tr", "data-model")
    assert sorted(models) == ["alpha-model", "beta-model", "gamma-embed", "shared-model"]
    holders = dict(zip(models, await asyncio.to_thread(b.texts, "#models tbody tr td:nth-child(2)"), strict=True))
    assert holders["shared-model"] == "east, south" and holders["alpha-model"] == "north"
    await asyncio.to_thread(b.wait, lambda: b.texts("#live-state") == ["live"], "the live stream connected")
    # The doctor's findings, as `quorum-node doctor` gives them: the three members are seen, each engine ready
    await asyncio.to_thread(b.wait, lambda: len(b.texts("#doctor tbody tr")) >= 3, "the doctor's findings")
    findings = await asyncio.to_thread(b.texts, "#doctor tbody tr td:nth-child(2)")
    assert any("east is up" in f for f in findings) and any("ready" in f for f in findings), findings

    # A request through the openai SDK: in flight while it streams, then in recent requests; no reload.
    for e in engines:
        e.token_delay_s = 0.7  # about 3 s of streaming, wherever it lands

    async def chat() -> str:
        stream = await client_for(north).chat.completions.create(
            model="shared-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": "browser-req-1"},
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    task = asyncio.create_task(chat())
    try:
        await asyncio.to_thread(
            b.wait, lambda: "browser-req-1" in b.attrs("#inflight tbody tr", "data-request"), "the request in flight"
        )
        assert await asyncio.to_thread(b.texts, "#inflight-count") == ["1"]
        assert await task == "Hello, world!"
    finally:
        task.cancel()
    await asyncio.to_thread(
        b.wait, lambda: "browser-req-1" in b.attrs("#recent tbody tr", "data-request"), "the request in recent requests"
    )
    row = (await asyncio.to_thread(b.texts, '#recent tbody tr[data-request="browser-req-1"]'))[0]
    assert "shared-model" in row and "lan" in row and "200" in row
    assert any(n in row for n in ("south", "east"))
    await asyncio.to_thread(b.wait, lambda: b.texts("#inflight-count") == ["0"], "nothing in flight any more")

    features = await _features(http, north)
    if features.get("usage"):  # the chart redraws a moment after a request ends

        def bar() -> bool:  # the tokens of the request: a bar of height > 0, in the legend with its count
            heights = [float(h) for h in b.attrs("#usage-chart svg rect", "height")]
            return any(h > 0 for h in heights) and any("(5)" in t for t in b.texts("#usage-chart .legend span"))

        await asyncio.to_thread(b.wait, bar, "the request's 5 tokens in the usage chart")
    if features.get("keys"):
        await asyncio.to_thread(_create_key_in_the_page, b, "laptop")
        assert any(k.name == "laptop" for k in north.keys.list())  # type: ignore[attr-defined]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert await asyncio.to_thread(b.driver.save_screenshot, str(shot))
    assert shot.stat().st_size > 10_000
    assert await asyncio.to_thread(b.errors) == [], "console errors"


def _create_key_in_the_page(b: Browser, name: str) -> None:
    b.driver.find_element(By.ID, "key-name").send_keys(name)
    b.driver.find_element(By.CSS_SELECTOR, "#key-create button[type=submit]").click()
    b.wait(lambda: b.driver.find_element(By.ID, "key-secret-value").text.startswith("qk_"), "the new key, shown once")
    b.wait(lambda: name in b.attrs("#keys tbody tr", "data-key"), "the new key in the list")


async def _features(http: aiohttp.ClientSession, node: Node) -> dict[str, bool]:
    async with http.get(node.url + "/quorum/admin/fleet") as resp:
        return (await resp.json())["features"]


async def test_the_page_asks_for_a_key_where_the_node_wants_one(
    start_node: StartNode, fake: StartFake, browser: Browser
) -> None:
    eng = await fake("openai", models=["m"])
    node = await start_node(name="locked", backends=[{"kind": "openai", "url": eng.url}], require_key=True)
    _, secret = node.keys.create("dashboard", admin=True)  # type: ignore[attr-defined]
    b = browser
    await asyncio.to_thread(b.driver.get, node.url + "/dashboard")  # the page itself needs no key

    def asks() -> bool:
        return (
            b.driver.find_element(By.ID, "key-panel").is_displayed()
            and not b.driver.find_element(By.ID, "main").is_displayed()
        )

    await asyncio.to_thread(b.wait, asks, "the page asks for a key, and shows nothing else")

    def enter_key() -> None:
        b.driver.find_element(By.ID, "key-input").send_keys(secret)
        b.driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()

    await asyncio.to_thread(enter_key)

    def fleet_shown() -> bool:
        return b.attrs("#fleet tbody tr", "data-node") == ["locked"] and b.texts("#live-state") == ["live"]

    await asyncio.to_thread(b.wait, fleet_shown, "with the key: the fleet, and the live stream")
    await asyncio.to_thread(b.driver.refresh)  # the key is remembered in this browser
    await asyncio.to_thread(b.wait, fleet_shown, "after a reload, without asking again")
    assert not await asyncio.to_thread(lambda: b.driver.find_element(By.ID, "key-panel").is_displayed())
    # the only console errors: the refused requests before the key was given
    assert await asyncio.to_thread(b.errors, lambda m: "status of 401" in m) == []
