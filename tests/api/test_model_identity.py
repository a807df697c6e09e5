"""Model identity through real nodes (issue 21): what each engine reports of a model reaches the node.

The fakes report what the real engines do (llama.cpp's ``/v1/models`` ``meta`` and ``/props``,
Ollama's ``/api/tags`` details and ``/api/show`` GGUF keys, LM Studio's ``/api/v0/models``); the
Ollama surface answers with it through the real ``ollama`` client (Open WebUI shows these fields), and
every adapter gives the same model, under its engine's own name, the same lineage.
"""

from __future__ import annotations

from collections.abc import Callable

import ollama

from quorum_node.backends.base import Backend, Model
from quorum_node.node import Node
from tests.conftest import StartFake, StartNode
from tests.fakes.lmstudio import CATALOG

MSGS = [{"role": "user", "content": "hi"}]
LLAMA_NAMES = {
    "ollama": "llama3.2:latest",
    "llamacpp": "/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf",
    "lmstudio": "llama-3.2-3b-instruct",
    "vllm": "meta-llama/Llama-3.2-3B-Instruct",
}


def held(node: Node) -> dict[str, tuple[Backend, Model]]:
    """This node's models by engine kind (one model each)."""
    return {b.kind: (b, m) for b, m in node.registry.models()}


async def test_ollama_clients_see_what_llama_cpp_reports(
    start_node: StartNode, fake: StartFake, client_of: Callable[[Node], ollama.AsyncClient]
) -> None:
    eng = await fake("llamacpp")  # llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf, as engines.md §14 saw it
    node = await start_node(backends=[{"kind": "llamacpp", "url": eng.url}])
    client = client_of(node)

    (listed,) = (await client.list()).models
    assert listed.model == "SmolLM2-135M-Instruct.Q4_1"
    d = listed.details
    assert d is not None
    # meta.n_params 134515008 as Ollama writes it; meta.ftype; the architecture SmolLM2 is built as
    assert (d.family, d.parameter_size, d.quantization_level, d.format) == ("llama", "134.52M", "Q4_1", "gguf")
    assert d.families == ["llama"]

    shown = await client.show("SmolLM2-135M-Instruct.Q4_1")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"  # not "unknown"
    assert "llama.context_length" in shown.modelinfo  # under its architecture, as Ollama keys it
    assert shown.details is not None and shown.details.parameter_size == "134.52M"
    assert shown.details.quantization_level == "Q4_1"


async def test_one_model_on_four_engines_has_one_lineage(start_node: StartNode, fake: StartFake) -> None:
    engines = {kind: await fake(kind, models=[name]) for kind, name in LLAMA_NAMES.items()}
    node = await start_node(backends=[{"kind": kind, "url": e.url} for kind, e in engines.items()])
    models = {kind: m for kind, (_, m) in held(node).items()}
    assert set(models) == set(LLAMA_NAMES)
    lineages = {kind: m.lineage for kind, m in models.items()}
    assert all(lin is not None for lin in lineages.values()), lineages

    entry = {kind: lin.entry_key() for kind, lin in lineages.items() if lin is not None}
    assert set(entry.values()) == {("llama3.2", "3b", "instruct", None)}
    weights = {kind: lin.weights_key() for kind, lin in lineages.items() if lin is not None}
    gguf = ("llama3.2", "3b", "instruct", None, "gguf", "Q4_K_M")
    assert weights == {"ollama": gguf, "llamacpp": gguf, "lmstudio": gguf, "vllm": (*gguf[:4], "safetensors", None)}

    # each from what its engine said, and it says so
    assert "general=Llama 3.2 3B Instruct" in lineages["ollama"].why  # /api/show's GGUF keys
    assert lineages["ollama"].digest == "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
    assert {"n_params=3212749888", "quantization=Q4_K_M"} <= set(lineages["llamacpp"].why)  # meta: "Q4_K - Medium"
    assert {"architecture=llama", "quantization=Q4_K_M"} <= set(lineages["lmstudio"].why)  # /api/v0/models
    # and the details every surface shows, alike where the engines said alike
    described = {kind: (m.family, m.quantization) for kind, m in models.items()}
    assert described == {
        "ollama": ("llama", "Q4_K_M"),
        "llamacpp": ("llama", "Q4_K_M"),
        "lmstudio": ("llama", "Q4_K_M"),
        "vllm": ("llama", None),
    }
    assert (models["ollama"].parameter_size, models["llamacpp"].parameter_size) == ("3.2B", "3.2B")


async def test_an_alias_is_seen_through_and_an_adapter_is_not_its_base(start_node: StartNode, fake: StartFake) -> None:
    # llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --alias assistant: /props names the file
    llama = await fake("llamacpp", models=["assistant"], model_path="/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    # vLLM with a LoRA adapter named like a model: its card's parent says what it is
    base = "meta-llama/Llama-3.2-3B-Instruct"
    vllm = await fake(
        "vllm", models=[base, "Llama-3.2-3B-Instruct-sql"], lora_parents={"Llama-3.2-3B-Instruct-sql": base}
    )
    node = await start_node(backends=[{"kind": "llamacpp", "url": llama.url}, {"kind": "vllm", "url": vllm.url}])
    by_id = {m.id: m for _, m in node.registry.models()}

    aliased = by_id["assistant"].lineage
    assert aliased is not None and aliased.weights_key() == ("smollm2", "135m", "instruct", None, "gguf", "Q4_1")
    assert aliased.why[0] == "path=/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    lin = by_id[base].lineage
    assert lin is not None and lin.entry_key() == ("llama3.2", "3b", "instruct", None)
    assert by_id["Llama-3.2-3B-Instruct-sql"].lineage is None  # never grouped with its base


async def test_metadata_is_fetched_once_not_at_every_refresh(start_node: StartNode, fake: StartFake) -> None:
    llama = await fake("llamacpp", total_slots=4)
    olla = await fake("ollama")  # two models, two digests
    vllm = await fake("vllm")
    node = await start_node(
        backends=[{"kind": k, "url": e.url} for k, e in (("llamacpp", llama), ("ollama", olla), ("vllm", vllm))]
    )
    for _ in range(3):
        await node.registry.refresh_once()
    assert llama.props_requests == 1 and olla.show_requests == 2

    engines = {b.kind: b for b, _ in node.registry.models()}
    assert engines["llamacpp"].capacity == 4  # its slots
    assert engines["vllm"].capacity is None and engines["ollama"].capacity is None  # they say no fixed number

    llama.models = ["/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf"]  # another model: asked again, once
    olla.models = ["llama3.2:latest"]  # one of the two it had: nothing new to ask
    for _ in range(3):
        await node.registry.refresh_once()
    assert llama.props_requests == 2 and olla.show_requests == 2
    (model,) = [m for b, m in node.registry.models() if b.kind == "llamacpp"]
    assert model.lineage is not None and model.lineage.size == "3b"


async def test_malformed_metadata_costs_only_the_lineage(start_node: StartNode, fake: StartFake) -> None:
    smol = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    llama = await fake("llamacpp", model_meta={smol: {"n_params": "lots", "ftype": 5}})
    lms = await fake("lmstudio", models=["llama-3.2-3b-instruct"])
    lms.model_facts = {"llama-3.2-3b-instruct": {**CATALOG["llama-3.2-3b-instruct"], "arch": ["llama"]}}
    node = await start_node(backends=[{"kind": k, "url": e.url} for k, e in (("llamacpp", llama), ("lmstudio", lms))])
    models = {kind: m for kind, (_, m) in held(node).items()}
    # listed as before, with what the engine said well (the context, the state), and no lineage
    assert models["llamacpp"].id == "SmolLM2-135M-Instruct.Q4_1" and models["llamacpp"].context_length == 4096
    assert models["llamacpp"].lineage is None and models["llamacpp"].quantization is None
    assert models["lmstudio"].context_length == 131072 and models["lmstudio"].lineage is None


# -- one catalog entry, many holders ------------------------------------------------------------------


async def test_one_model_on_four_engines_is_one_entry_every_name_selects(
    start_node: StartNode, fake: StartFake, http
) -> None:
    engines = {kind: await fake(kind, models=[name]) for kind, name in LLAMA_NAMES.items()}
    node = await start_node(backends=[{"kind": kind, "url": e.url} for kind, e in engines.items()])
    async with http.get(node.url + "/v1/models") as resp:
        listed = {m["id"]: m for m in (await resp.json())["data"]}
    assert list(listed) == ["llama3.2:3b-instruct"]  # one entry, under the model's own name
    entry = listed["llama3.2:3b-instruct"]
    assert entry["engines"] == sorted(LLAMA_NAMES)  # four holders
    assert {"llama3.2:latest", "Llama-3.2-3B-Instruct-Q4_K_M", "llama-3.2-3b-instruct"} <= set(entry["aliases"])
    assert entry["lineage"]["quantizations"] == ["Q4_K_M", "safetensors"] and "why" in entry["lineage"]
    from tests.support import cli

    rc, out, err = await cli("models", "--url", node.url)  # the same, as a person reads it
    assert rc == 0, err
    (row,) = out.strip().splitlines()[1:]
    assert row.startswith("llama3.2:3b-instruct") and "llama3.2 3b instruct (Q4_K_M,safetensors)" in row
    assert "node0:meta-llama/Llama-3.2-3B-Instruct" in row
    # every name a user knows is served, by a holder of those weights
    served: dict[str, set[str]] = {}
    for name in (
        "llama3.2",
        "llama3.2:3b",
        "llama3.2:3b-instruct",
        "Llama-3.2-3B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
    ):
        before = {k: len(e.requests) for k, e in engines.items()}
        async with http.post(node.url + "/v1/chat/completions", json={"model": name, "messages": MSGS}) as resp:
            assert resp.status == 200, (name, await resp.text())
        served[name] = {k for k, e in engines.items() if len(e.requests) > before[k]}
    assert all(len(kinds) == 1 for kinds in served.values())
    # a name that pins the weights (the GGUF stem, Q4_K_M) never gets the full-precision copy on vLLM, while
    # the model's own name spreads over all four (12 conversations: affinity ranks the holders for each)
    for name, vllm_may_serve in (("Llama-3.2-3B-Instruct-Q4_K_M", False), ("llama3.2:3b", True)):
        before = {k: len(e.requests) for k, e in engines.items()}
        for c in range(12):
            body = {"model": name, "messages": [{"role": "user", "content": f"{name}: conversation {c}"}]}
            async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
        got = {k: len(e.requests) - before[k] for k, e in engines.items()}
        assert (got["vllm"] > 0) is vllm_may_serve, (name, got)
    sent_to_vllm = {r["model"] for r in engines["vllm"].requests}
    assert sent_to_vllm == {"meta-llama/Llama-3.2-3B-Instruct"}  # each engine gets its own name for it


async def test_near_misses_stay_apart(start_node: StartNode, fake: StartFake, http) -> None:
    names = {
        "ollama": "llama3.2:1b",  # another size
        "llamacpp": "/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        "vllm": "meta-llama/Llama-3.1-8B-Instruct",  # another family
    }
    engines = {kind: await fake(kind, models=[name]) for kind, name in names.items()}
    lms = await fake("lmstudio", models=["qwen2.5-0.5b-instruct"])
    node = await start_node(
        backends=[{"kind": kind, "url": e.url} for kind, e in (*engines.items(), ("lmstudio", lms))]
    )
    async with http.get(node.url + "/v1/models") as resp:
        listed = [m["id"] for m in (await resp.json())["data"]]
    assert len(listed) == 4  # four models, none merged
    async with http.post(node.url + "/v1/chat/completions", json={"model": "llama3.2:1b", "messages": MSGS}) as resp:
        assert resp.status == 200
    assert len(engines["ollama"].requests) == 1 and not engines["llamacpp"].requests


async def test_a_peers_model_is_asked_for_by_any_of_its_names(start_node: StartNode, fake: StartFake, http) -> None:
    """Node a holds nothing; b's llama.cpp holds the GGUF. Asked at a for `llama3.2`, b serves it, sent b's name."""
    from tests.members_support import CLUSTER
    from tests.support import eventually

    gguf = await fake("llamacpp", models=[LLAMA_NAMES["llamacpp"]])
    b = await start_node(backends=[{"kind": "llamacpp", "url": gguf.url}], **CLUSTER)
    a = await start_node(**CLUSTER)
    assert a.cluster is not None and b.cluster is not None
    a.cluster.table.add_static(f"127.0.0.1:{b.peer_port}")
    b.cluster.table.add_static(f"127.0.0.1:{a.peer_port}")

    async def sees() -> bool:
        return a.router.view().find("llama3.2") is not None

    await eventually(sees, "a knows b's model by its lineage")
    for name in ("llama3.2", "llama3.2:3b-instruct", "Llama-3.2-3B-Instruct-Q4_K_M"):
        async with http.post(a.url + "/v1/chat/completions", json={"model": name, "messages": MSGS}) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Quorum-Node"] == "node0"
    assert [r["model"] for r in gguf.requests] == [LLAMA_NAMES["llamacpp"]] * 3  # the engine's own id, each time


async def test_a_name_of_the_users_own_selects_the_model_it_names(start_node: StartNode, fake: StartFake, http) -> None:
    """``model_aliases``: for what the node cannot tell by itself (here a name no engine reports)."""
    olla = await fake("ollama", models=[LLAMA_NAMES["ollama"]])
    node = await start_node(
        backends=[{"kind": "ollama", "url": olla.url}],
        model_aliases={"house-assistant": "llama3.2:3b-instruct", "ghost": "no-such-model"},
    )
    body = {"model": "house-assistant", "messages": MSGS}
    async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
    assert olla.requests[-1]["model"] == LLAMA_NAMES["ollama"]  # the engine's own name
    async with http.post(node.url + "/v1/chat/completions", json={**body, "model": "ghost"}) as resp:
        assert resp.status == 404  # an alias of a model nobody holds names nothing
