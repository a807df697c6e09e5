"""Model identity (``quorum_node/lineage.py``): every engine's words for one model give one lineage;
near misses stay apart; what cannot be told with confidence gives none, and nothing raises.

Pure logic, fed what the engines report (engines.md §4, §5, §9, §14), as the adapters collect it.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quorum_node.backends.wire import CardFacts, OllamaTagFacts, decode_entry, gguf_general
from quorum_node.lineage import (
    Lineage,
    ModelMeta,
    details_of,
    identify,
    name_key,
    normalise_quantization,
    parameter_label,
    size_from_params,
)
from quorum_node.names import is_model_id

M = ModelMeta
# What each engine says of Llama 3.2 3B Instruct at Q4_K_M: Ollama's /api/tags and /api/show, llama.cpp's
# /v1/models meta (a current build names its ftype), LM Studio's /api/v0/models.
OLLAMA_LLAMA = M(
    architecture="llama",
    families=("llama",),
    parameter_size="3.2B",
    quantization="Q4_K_M",
    format="gguf",
    digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
    basename="Llama 3.2",
    size_label="3B",
    finetune="Instruct",
    general_name="Llama 3.2 3B Instruct",
    n_params=3212749888,
    ftype=15,
)
LLAMACPP_LLAMA = M(n_params=3212749888, ftype="Q4_K - Medium")
LMS_LLAMA = M(architecture="llama", quantization="Q4_K_M", format="gguf")
SMOL_META = M(n_params=134515008, ftype="Q4_1")  # what llama-server said of SmolLM2-135M-Instruct.Q4_1.gguf

# One model, many names: every row of a group has the group's entry key; rows marked True share the
# group's first row's weights key too (the same file, on another engine).
SAME: dict[str, list[tuple[str, str, ModelMeta, bool]]] = {
    "llama3.2 3b instruct": [
        ("ollama", "llama3.2:latest", OLLAMA_LLAMA, True),
        ("ollama", "llama3.2:3b", M(parameter_size="3.2B", quantization="Q4_K_M", format="gguf"), True),
        ("ollama", "llama3.2:3b-instruct-q4_K_M", M(), True),
        ("ollama", "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M", M(architecture="llama"), True),
        ("llamacpp", "/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf", LLAMACPP_LLAMA, True),
        ("llamacpp", "../models/llama-3.2-3b-instruct-q4_k_m.gguf", M(), True),
        ("llamacpp", "my-llama", M(path="/srv/Llama-3.2-3B-Instruct-Q4_K_M.gguf", n_params=3212749888), True),
        ("lmstudio", "llama-3.2-3b-instruct", LMS_LLAMA, True),
        ("lmstudio", "lmstudio-community/Llama-3.2-3B-Instruct-GGUF/Llama-3.2-3B-Instruct-Q4_K_M.gguf", M(), True),
        ("vllm", "meta-llama/Llama-3.2-3B-Instruct", M(path="meta-llama/Llama-3.2-3B-Instruct"), False),
        ("vllm", "llama", M(path="/models/Llama-3.2-3B-Instruct"), False),  # --served-model-name llama
        ("sglang", "meta-llama/Llama-3.2-3B-Instruct", M(), False),
        ("tgi", "meta-llama/Llama-3.2-3B-Instruct", M(), False),
        ("mlx", "mlx-community/Llama-3.2-3B-Instruct-4bit", M(), False),
        ("lmstudio", "llama-3.2-3b-instruct", M(architecture="llama", quantization="4bit", format="mlx"), False),
    ],
    "smollm2 135m instruct": [
        ("llamacpp", "/models/SmolLM2-135M-Instruct.Q4_1.gguf", SMOL_META, True),
        (
            "llamacpp",
            "assistant",
            msgspec.structs.replace(SMOL_META, path="/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            True,
        ),
        ("llamacpp", "SmolLM2-135M-Instruct-Q8_0", M(n_params=134515008, ftype="Q8_0"), False),
        ("ollama", "smollm2:135m", M(architecture="llama", parameter_size="134.52M", quantization="F16"), False),
        ("vllm", "HuggingFaceTB/SmolLM2-135M-Instruct", M(), False),
    ],
    "qwen2.5 0.5b instruct": [
        ("ollama", "qwen2.5:0.5b", M(architecture="qwen2", parameter_size="494.03M", quantization="Q4_K_M"), True),
        ("llamacpp", "qwen2.5-0.5b-instruct-q4_k_m.gguf", M(n_params=494032768, ftype="Q4_K - Medium"), True),
        ("lmstudio", "qwen2.5-0.5b-instruct", M(architecture="qwen2", quantization="Q4_K_M", format="gguf"), True),
        ("vllm", "Qwen/Qwen2.5-0.5B-Instruct", M(), False),
        ("vllm", "Qwen/Qwen2.5-0.5B-Instruct-AWQ", M(), False),
    ],
    "mistral 7b instruct v0.3": [
        ("ollama", "mistral:7b-instruct-v0.3-q4_K_M", M(architecture="llama", parameter_size="7.2B"), True),
        ("llamacpp", "Mistral-7B-Instruct-v0.3.Q4_K_M.gguf", M(n_params=7248023552), True),
        ("vllm", "mistralai/Mistral-7B-Instruct-v0.3", M(), False),
    ],
    "gemma2 2b instruct": [
        ("ollama", "gemma2:2b", M(architecture="gemma2", parameter_size="2.6B", quantization="Q4_0"), True),
        ("llamacpp", "gemma-2-2b-it-Q4_0.gguf", M(n_params=2614341888), True),
        ("vllm", "google/gemma-2-2b-it", M(), False),
    ],
    "qwen2.5 coder 7b instruct": [
        ("ollama", "qwen2.5-coder:7b", M(architecture="qwen2", parameter_size="7.6B", quantization="Q4_K_M"), True),
        ("vllm", "Qwen/Qwen2.5-Coder-7B-Instruct", M(), False),
    ],
}


def _must(kind: str, model_id: str, meta: ModelMeta) -> Lineage:
    lin = identify(kind, model_id, meta)
    assert lin is not None, (kind, model_id)
    return lin


@pytest.mark.parametrize("group", sorted(SAME))
def test_every_engine_s_words_for_one_model_give_one_entry(group: str) -> None:
    rows = SAME[group]
    first = _must(*rows[0][:3])
    for kind, model_id, meta, same_file in rows:
        lin = _must(kind, model_id, meta)
        assert lin.entry_key() == first.entry_key(), (kind, model_id)
        assert (lin.weights_key() == first.weights_key()) is same_file, (kind, model_id, lin.weights_key())


def test_the_canonical_lineage_of_llama_3_2_on_ollama() -> None:
    lin = _must("ollama", "llama3.2:latest", OLLAMA_LLAMA)
    assert lin.entry_key() == ("llama3.2", "3b", "instruct", None)
    assert lin.weights_key() == ("llama3.2", "3b", "instruct", None, "gguf", "Q4_K_M")
    assert lin.digest == OLLAMA_LLAMA.digest
    assert "n_params=3212749888" in lin.why
    assert any(w.startswith("general=Llama 3.2 3B Instruct") for w in lin.why)  # /api/show confirmed it


def test_the_evidence_names_what_the_engine_reported() -> None:
    lin = _must("llamacpp", "assistant", M(path="/m/SmolLM2-135M-Instruct.Q4_1.gguf", n_params=134515008, ftype="Q4_1"))
    assert lin.weights_key() == ("smollm2", "135m", "instruct", None, "gguf", "Q4_1")
    assert lin.why == ("path=/m/SmolLM2-135M-Instruct.Q4_1.gguf", "n_params=134515008", "quantization=Q4_1")
    # a name without a size: the count says it, and the evidence says so
    lin = _must("llamacpp", "SmolLM2-Instruct.Q4_1", M(n_params=134515008))
    assert lin.size == "135m" and "n_params=134515008 -> 135m" in lin.why


# Pairs that look alike and are not the same model: never one entry (one of them may have no lineage).
APART: list[tuple[tuple[str, str, ModelMeta], tuple[str, str, ModelMeta]]] = [
    (("ollama", "llama3.2:1b", M()), ("ollama", "llama3.2:3b", M())),
    (("vllm", "meta-llama/Llama-3.2-1B-Instruct", M()), ("vllm", "meta-llama/Llama-3.2-3B-Instruct", M())),
    (("vllm", "Qwen/Qwen2.5-0.5B", M()), ("vllm", "Qwen/Qwen2.5-0.5B-Instruct", M())),  # base vs instruct
    (("ollama", "qwen2.5:0.5b", M()), ("vllm", "Qwen/Qwen2.5-0.5B", M())),  # Ollama's default tag: instruct
    (("ollama", "llama3.2:3b-text", M()), ("ollama", "llama3.2:3b", M())),
    (("vllm", "meta-llama/Llama-3.1-8B-Instruct", M()), ("vllm", "meta-llama/Meta-Llama-3-8B-Instruct", M())),
    (("ollama", "llama3.1:8b", M()), ("ollama", "llama3:8b", M())),
    (("ollama", "qwen2:7b", M()), ("ollama", "qwen2.5:7b", M())),
    (("vllm", "Qwen/Qwen2-7B-Instruct", M()), ("vllm", "Qwen/Qwen2.5-7B-Instruct", M())),
    (("ollama", "phi3:3.8b", M()), ("ollama", "phi3.5:3.8b", M())),
    (("vllm", "microsoft/Phi-3-mini-4k-instruct", M()), ("vllm", "microsoft/Phi-3.5-mini-instruct", M())),
    (("vllm", "microsoft/Phi-3-mini-4k-instruct", M()), ("vllm", "microsoft/Phi-3-mini-128k-instruct", M())),
    (("ollama", "mistral:7b", M()), ("ollama", "mixtral:8x7b", M())),
    (("vllm", "mistralai/Mistral-7B-Instruct-v0.2", M()), ("vllm", "mistralai/Mistral-7B-Instruct-v0.3", M())),
    (("ollama", "mistral:7b", M()), ("vllm", "mistralai/Mistral-7B-Instruct-v0.3", M())),  # which v0.x: unknown
    (("ollama", "mistral-nemo:12b", M()), ("ollama", "mistral:7b", M())),
    (("ollama", "codellama:7b", M()), ("ollama", "llama2:7b", M())),
    (("vllm", "codellama/CodeLlama-7b-Instruct-hf", M()), ("vllm", "meta-llama/Llama-2-7b-chat-hf", M())),
    (("ollama", "qwen2.5-coder:7b", M()), ("ollama", "qwen2.5:7b", M())),
    (("vllm", "Qwen/Qwen2.5-Coder-7B", M()), ("vllm", "Qwen/Qwen2.5-Coder-7B-Instruct", M())),
    (("ollama", "smollm:135m", M()), ("ollama", "smollm2:135m", M())),
    (("ollama", "gemma:2b", M()), ("ollama", "gemma2:2b", M())),
    (("ollama", "tinyllama:1.1b", M()), ("ollama", "llama3.2:1b", M())),
    (("vllm", "meta-llama/Llama-3.2-11B-Vision-Instruct", M()), ("vllm", "meta-llama/Llama-3.2-11B-Instruct", M())),
    (("ollama", "llama3.2-vision:11b", M()), ("ollama", "llama3.2:3b", M())),
]


@pytest.mark.parametrize(("a", "b"), APART, ids=[f"{a[1]}|{b[1]}" for a, b in APART])
def test_near_misses_stay_apart(a: tuple[str, str, ModelMeta], b: tuple[str, str, ModelMeta]) -> None:
    la, lb = identify(*a), identify(*b)
    assert la is not None or lb is not None  # the pair says something: apart by its keys, not by luck
    assert la is None or lb is None or la.entry_key() != lb.entry_key()


NONE: list[tuple[str, str, ModelMeta]] = [
    ("openai", "gpt-4o-mini", M()),
    ("localai", "phi-2.Q4_K_M.gguf", M()),  # phi-2 has one size; no count said it: not told
    ("ollama", "my-assistant:latest", M(architecture="llama", parameter_size="3.2B", basename="Llama 3.2")),
    ("ollama", "llama3.2:latest", M()),  # no size in the name, no count
    ("ollama", "llama", M(parameter_size="3.2B")),  # which llama?
    ("vllm", "NousResearch/Hermes-3-Llama-3.2-3B", M()),
    ("vllm", "mlabonne/Llama-3.2-3B-Instruct-abliterated", M()),  # a finetune is not its base
    ("vllm", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", M()),
    ("vllm", "Qwen/Qwen2.5-7B-Instruct-1M", M()),  # 1m: a second size
    ("vllm", "Qwen/Qwen3-30B-A3B", M()),
    ("ollama", "nomic-embed-text:latest", M(architecture="nomic-bert", parameter_size="137M")),
    ("ollama", "llava:7b", M()),
    ("lmstudio", "text-embedding-nomic-embed-text-v1.5", M()),
    # evidence that contradicts the name
    ("llamacpp", "/m/Llama-3.2-3B-Instruct-Q4_K_M.gguf", M(n_params=1235814400)),  # a 1B file named 3B
    ("ollama", "llama3.2:latest", M(architecture="qwen2", parameter_size="3.2B")),
    ("ollama", "llama3.2:3b", M(basename="Llama 3.2", size_label="1B")),
    ("ollama", "llama3.2:3b-instruct", M(basename="Llama 3.2", size_label="3B", finetune="Base")),
    ("llamacpp", "Llama-3.2-3B-Instruct.gguf", M(path="/m/Qwen2.5-3B-Instruct.gguf")),
    ("vllm", "sql-lora", M(path="/adapters/sql", adapter_of="meta-llama/Llama-3.2-3B-Instruct")),
    ("vllm", "meta-llama/Llama-3.2-3B-Instruct", M(adapter_of="meta-llama/Llama-3.2-3B-Instruct")),  # a LoRA card
    ("llamacpp", "llama-3.2-3b-instruct-q4_k_m-00001-of-00002.gguf", M()),
    ("vllm", "", M()),
]


@pytest.mark.parametrize(("kind", "model_id", "meta"), NONE, ids=[f"{k}:{i}" for k, i, _ in NONE])
def test_what_cannot_be_told_with_confidence_has_no_lineage(kind: str, model_id: str, meta: ModelMeta) -> None:
    assert identify(kind, model_id, meta) is None


@pytest.mark.parametrize(
    ("n", "family", "size"),
    [
        (134515008, "smollm2", "135m"),
        (361821120, "smollm2", "360m"),
        (1711376384, "smollm2", "1.7b"),
        (3.21e9, "llama3.2", "3b"),
        (1235814400, "llama3.2", "1b"),
        (494032768, "qwen2.5", "0.5b"),
        (1543714304, "qwen2.5", "1.5b"),
        (7615616512, "qwen2.5", "7b"),
        (2614341888, "gemma2", "2b"),
        (46702792704, "mixtral", "8x7b"),
        (3821079552, "phi3", "3.8b"),
        (5e9, "llama3.2", None),  # no llama3.2 is that size
        (3.21e9, None, "3.2b"),  # a family with no known sizes: the count, rounded
        (134515008, None, "135m"),
        (500e6, None, "0.5b"),
        (float("nan"), "llama3.2", None),
        (-1, None, None),
    ],
)
def test_size_from_a_parameter_count(n: float, family: str | None, size: str | None) -> None:
    assert size_from_params(n, family) == size


def test_a_size_from_a_name_and_one_from_a_count_agree() -> None:
    by_name = _must("vllm", "HuggingFaceTB/SmolLM2-135M-Instruct", M())
    by_count = _must("llamacpp", "smollm2-instruct-q8_0", M(n_params=134515008))
    assert by_name.entry_key() == by_count.entry_key()
    assert _must("vllm", "Qwen/Qwen2.5-0.5B-Instruct", M()).size == _must("vllm", "qwen2.5-500M-instruct", M()).size


@pytest.mark.parametrize(
    ("said", "canonical"),
    [
        ("Q4_K_M", "Q4_K_M"),
        ("q4_K_M", "Q4_K_M"),
        ("q4_k_m", "Q4_K_M"),
        ("Q4_K - Medium", "Q4_K_M"),  # llama.cpp's ftype name
        ("mostly Q4_K - Medium", "Q4_K_M"),  # older builds
        ("Q4_K - Small (guessed)", "Q4_K_S"),
        ("Q3_K - Extra small", "Q3_K_XS"),
        ("Q2_K - Medium", "Q2_K"),  # LLAMA_FTYPE_MOSTLY_Q2_K: Ollama calls it Q2_K
        ("IQ2_XSS - 2.0625 bpw", "IQ2_XXS"),  # llama.cpp's misspelling
        ("TQ1_0 - 1.69 bpw ternary", "TQ1_0"),
        ("Q4_1", "Q4_1"),
        ("Q8_0", "Q8_0"),
        ("fp16", "F16"),
        ("F16", "F16"),
        ("all F32", "F32"),
        ("BF16", "BF16"),
        ("MXFP4 MoE", "MXFP4"),
        ("4bit", "4BIT"),
        ("AWQ", "AWQ"),
        ("GPTQ-Int4", "GPTQ_INT4"),
        ("FP8", "FP8"),
        ("Q4_1, some F16", None),
        ("unknown, may not work", None),
        ("Q4_0_4_4", None),
        ("", None),
        ("Q4_K_M" * 50, None),
    ],
)
def test_quantization_names_are_normalised(said: str, canonical: str | None) -> None:
    assert normalise_quantization(said) == canonical


def test_gguf_file_types_are_read_as_numbers() -> None:
    lin = _must("ollama", "llama3.2:3b", M(ftype=15))
    assert lin.quantization == "Q4_K_M"
    assert _must("ollama", "llama3.2:3b", M(ftype=32)).quantization == "BF16"
    assert _must("ollama", "llama3.2:3b", M(ftype=999)).quantization is None


@pytest.mark.parametrize(
    ("n", "label"),
    [(134515008, "134.52M"), (3212749888, "3.2B"), (8030261312, "8.0B"), (8_000_000_000, "8B"), (137_000_000, "137M")],
)
def test_parameter_counts_are_shown_as_ollama_shows_them(n: int, label: str) -> None:
    assert parameter_label(n) == label


def test_details_come_from_the_engine_else_from_the_lineage() -> None:
    # llama.cpp says the count and the ftype; the architecture comes from the family
    assert details_of(SMOL_META, identify("llamacpp", "SmolLM2-135M-Instruct.Q4_1", SMOL_META)) == (
        "llama",
        "134.52M",
        "Q4_1",
    )
    # vLLM says nothing but the name
    assert details_of(M(), identify("vllm", "Qwen/Qwen2.5-0.5B-Instruct-AWQ", M())) == ("qwen2", "0.5B", "AWQ")
    assert details_of(M(), None) == (None, None, None)
    assert details_of(M(quantization="Q4_0_4_4"), None)[2] == "Q4_0_4_4"  # a word it cannot read: as written
    # an engine's own words win, even where they are not ones this module reads
    assert details_of(M(architecture="nomic-bert", parameter_size="137M", quantization="F16"), None) == (
        "nomic-bert",
        "137M",
        "F16",
    )


def test_names_select_the_entry_by_every_name_users_know() -> None:
    lin = _must("llamacpp", "/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf", LLAMACPP_LLAMA)
    names = set(lin.names())
    for asked in (
        "llama3.2",
        "llama3.2:latest",
        "llama3.2:3b",
        "llama3.2:3b-instruct",
        "Llama-3.2-3B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
        "llama-3.2-3b-instruct",
    ):
        assert name_key(asked) in names, asked
    weights = set(lin.weights_names())
    assert name_key("/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf") in weights
    assert name_key("llama3.2:3b-instruct-q4_K_M") in weights
    # another size, another variant: not its names
    assert name_key("llama3.2:1b") not in names and name_key("llama3.2:3b-text") not in names
    # only the default size has the bare name
    assert "llama3.2" not in _must("ollama", "llama3.2:1b", M()).names()
    assert _must("vllm", "google/gemma-2-2b-it", M()).names() == ("gemma2:2b", "gemma2:2b-instruct", "gemma-2-2b-it")
    assert _must("vllm", "Qwen/Qwen2.5-0.5B", M()).names() == ("qwen2.5-0.5b",)  # unknown variant: no Ollama name
    assert _must("vllm", "mistralai/Mistral-7B-Instruct-v0.3", M()).names() == (
        "mistral:7b-instruct-v0.3",
        "mistral-7b-instruct-v0.3",
    )


def test_a_lineage_from_a_peer_is_checked() -> None:
    lin = _must("ollama", "llama3.2:latest", OLLAMA_LLAMA)
    raw = msgspec.json.encode(lin)
    assert msgspec.json.decode(raw, type=Lineage) == lin
    for field, bad in (
        ("family", "llama\r\n"),
        ("size", "3" * 40),
        ("variant", "instruct; rm -rf"),
        ("quantization", "q" * 100),
        ("digest", "xyz"),
        ("why", ["x"] * 100),
    ):
        forged = {**msgspec.to_builtins(lin), field: bad}
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(msgspec.json.encode(forged), type=Lineage)
    # a family this node does not know (a newer peer's) is still a lineage, with names
    newer = msgspec.json.decode(msgspec.json.encode({**msgspec.to_builtins(lin), "family": "llama9"}), type=Lineage)
    assert newer.names() == ("llama9:3b", "llama9:3b-instruct", "llama9-3b-instruct")


HOSTILE = [
    "llama3.2:3b" + "x" * 100_000,
    "llama3.2:3b\r\nX-Evil: 1",
    "llama3.2:3b\x00",
    "llama\u0663.\u0662:3b",  # Arabic-Indic digits: not ASCII, not read
    "llama3.2:3b\u200b",  # a zero-width space
    "\u202ellama3.2:3b",  # a right-to-left override
    "\u2113lama3.2:3b",  # a script small l
    "LLAMA3.2:3B" * 30,
    "-" * 300,
    "...",
    ":::",
    "/" * 50,
    "q4_k_m",
    "3b",
]


@pytest.mark.parametrize("model_id", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_names_give_no_lineage_and_no_exception(model_id: str) -> None:
    assert identify("ollama", model_id, M()) is None
    hostile_meta = M(
        path=model_id,
        architecture=model_id,
        basename=model_id,
        parameter_size=model_id,
        quantization=model_id,
        ftype=model_id,
        digest=model_id,
        n_params=10**400,
        families=(model_id,) * 1000,
    )
    # garbage from an engine is no witness: a well-named model it reports so has no lineage
    assert identify("llamacpp", "/m/SmolLM2-135M-Instruct.Q4_1.gguf", hostile_meta) is None
    identify("vllm", model_id, hostile_meta)  # says nothing, raises nothing


_texts = st.one_of(st.none(), st.text(max_size=80), st.sampled_from(["llama", "3.2B", "Q4_K_M", "Instruct", "gguf"]))
_metas = st.builds(
    ModelMeta,
    path=_texts,
    architecture=_texts,
    families=st.lists(st.text(max_size=20), max_size=4).map(tuple),
    basename=_texts,
    size_label=_texts,
    finetune=_texts,
    general_name=_texts,
    n_params=st.one_of(st.none(), st.integers(min_value=-(10**30), max_value=10**30)),
    ftype=st.one_of(st.none(), st.integers(min_value=-(10**30), max_value=10**30), st.text(max_size=40)),
    parameter_size=_texts,
    quantization=_texts,
    format=_texts,
    digest=_texts,
    adapter_of=st.one_of(st.none(), st.just("base")),
)
_ids = st.one_of(
    st.text(max_size=120),
    st.sampled_from([row[1] for rows in SAME.values() for row in rows]),
    st.builds(
        lambda fam, size, rest: f"{fam}{size}{rest}",
        st.sampled_from(["llama3.2:", "Qwen2.5-", "SmolLM2-", "phi-3-", "gemma-2-", "mistral-", "mixtral:"]),
        st.sampled_from(["", "3b", "0.5B", "135M", "8x7b", "mini", "1m"]),
        st.text(alphabet="-_.:abikmqstvx0123456789", max_size=20),
    ),
)
_kinds = st.sampled_from(["ollama", "llamacpp", "vllm", "sglang", "tgi", "lmstudio", "mlx", "localai", "openai", ""])


@settings(max_examples=400, deadline=None)
@given(kind=_kinds, model_id=_ids, meta=_metas)
def test_identify_never_raises_and_what_it_gives_is_well_formed(kind: str, model_id: str, meta: ModelMeta) -> None:
    lin = identify(kind, model_id, meta)
    details_of(meta, lin)
    if lin is None:
        return
    # a lineage a node makes is one its peers accept (every field within its pattern)
    assert msgspec.json.decode(msgspec.json.encode(lin), type=Lineage) == lin
    for name in (*lin.names(), *lin.weights_names()):
        assert is_model_id(name) and name_key(name) == name


def test_the_engine_facts_are_decoded_each_on_its_own() -> None:
    info = {
        k: msgspec.Raw(msgspec.json.encode(v))
        for k, v in {
            "general.architecture": "llama",
            "general.basename": 7,  # malformed: left out, the rest kept
            "general.size_label": "3B",
            "general.parameter_count": -5,
            "general.file_type": 15,
            "llama.context_length": 131072,
        }.items()
    }
    g = gguf_general(info)
    assert (g.architecture, g.basename, g.size_label, g.parameter_count, g.file_type, g.context_length) == (
        "llama",
        None,
        "3B",
        None,
        15,
        131072,
    )
    bad_families = msgspec.Raw(b'{"name": "llama3.2:latest", "details": {"families": "llama", "format": "gguf"}}')
    assert decode_entry(bad_families, OllamaTagFacts) is None  # the adapter then gives it no lineage
    card = msgspec.Raw(b'{"id": "m", "created": "yesterday", "meta": {"n_params": 134515008, "ftype": "Q4_1"}}')
    facts = decode_entry(card, CardFacts)
    assert facts is not None and facts.meta is not None and facts.meta.n_params == 134515008
    assert decode_entry(msgspec.Raw(b'{"id": "m", "meta": {"ftype": 5}}'), CardFacts) is None
