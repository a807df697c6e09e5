"""Which model a model is: one canonical identity, derived from what the engines report.

The same weights have a different name on every engine: ``llama3.2:3b`` on
Ollama, ``Llama-3.2-3B-Instruct-Q4_K_M.gguf`` on llama.cpp,
``llama-3.2-3b-instruct`` on LM Studio, ``meta-llama/Llama-3.2-3B-Instruct``
on vLLM. ``identify`` reads a model's id and what its engine said about it
(``ModelMeta``: GGUF ``general.*`` keys, a parameter count, a file type,
Ollama's details, LM Studio's arch and quantization, the file or repo it
loaded) and returns its ``Lineage``: family, size, variant, revision, format
and quantization in canonical spellings, with the evidence (``why``).

A wrong merge is worse than none, so the parser is strict. A name is read
token by token and every token must be one it knows (a family at the start,
then sizes, variant markers, quantizations, revisions and a few words that
say nothing); one unknown word (``abliterated``, ``hermes``, ``distill``)
and the name says nothing. Evidence that disagrees (a name that says 3B and a
parameter count of 1.2 billion, an architecture the family never had)
leaves the model without a lineage. Unknown stays unknown: a name without a
variant marker has variant None, which no instruct or base model shares.

Pure logic: no I/O, nothing awaits, and nothing raises on any input.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, NamedTuple

import msgspec

__all__ = [
    "Lineage",
    "ModelMeta",
    "architecture_of",
    "details_of",
    "identify",
    "name_key",
    "normalise_quantization",
    "parameter_label",
    "size_from_params",
]

#: A name (or any reported string) longer than this is not read: no real model name is.
MAX_TEXT = 256
_WHY_MAX = 12  # pieces of evidence kept
_CITE_MAX = 64  # characters of a reported value quoted in the evidence

_Family = Annotated[str, msgspec.Meta(pattern=r"\A[a-z][a-z0-9.\-]{0,31}\Z")]
_Size = Annotated[str, msgspec.Meta(pattern=r"\A(?:[0-9]{1,2}x)?[0-9]{1,4}(?:\.[0-9]{1,3})?[mbt]\Z")]
_Variant = Annotated[str, msgspec.Meta(pattern=r"\A[a-z]{1,12}(?:-[a-z]{1,12}){0,3}\Z")]
_Revision = Annotated[str, msgspec.Meta(pattern=r"\A[a-z0-9.]{1,12}(?:-[a-z0-9.]{1,12}){0,2}\Z")]
_Format = Annotated[str, msgspec.Meta(pattern=r"\A(?:gguf|mlx|safetensors)\Z")]
_Quant = Annotated[str, msgspec.Meta(pattern=r"\A[A-Z0-9_]{1,24}\Z")]
_Digest = Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{64}\Z")]
_Why = Annotated[
    tuple[Annotated[str, msgspec.Meta(max_length=200, pattern=r"\A[\x20-\x7e]*\Z")], ...],
    msgspec.Meta(max_length=_WHY_MAX),
]


class ModelMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine reported about one model, as its adapter collected it. Every field may be missing."""

    path: str | None = None  # the file or repo it loaded: llama.cpp /props model_path, vLLM/SGLang root
    architecture: str | None = None  # GGUF general.architecture, Ollama details.family, LM Studio arch
    families: tuple[str, ...] = ()  # Ollama details.families
    basename: str | None = None  # GGUF general.basename ("Llama 3.2")
    size_label: str | None = None  # GGUF general.size_label ("3B")
    finetune: str | None = None  # GGUF general.finetune ("Instruct")
    general_name: str | None = None  # GGUF general.name ("Llama 3.2 3B Instruct")
    n_params: int | None = None  # llama.cpp meta.n_params, GGUF general.parameter_count
    ftype: str | int | None = None  # llama.cpp meta.ftype ("Q4_K - Medium"), GGUF general.file_type (15)
    parameter_size: str | None = None  # Ollama details.parameter_size ("3.2B")
    quantization: str | None = None  # Ollama details.quantization_level, LM Studio quantization
    format: str | None = None  # Ollama details.format, LM Studio compatibility_type: gguf, mlx, safetensors
    digest: str | None = None  # Ollama's digest of the model
    adapter_of: str | None = None  # a vLLM LoRA card's parent: an adapter, not the base model's weights


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    """The canonical identity of a model's weights, and why it was given.

    Decoded from a peer, every field is checked against its pattern.
    """

    family: _Family  # "llama3.2", "qwen2.5", "smollm2", "mistral-nemo"
    size: _Size  # "3b", "135m", "0.5b", "8x7b"
    variant: _Variant | None = None  # "instruct", "base", "coder-instruct", "vision-instruct"; None: unknown
    revision: _Revision | None = None  # "v0.3", "2407", "4k" (Phi's context variants); None: none named
    format: _Format | None = None  # how the weights are stored
    quantization: _Quant | None = None  # "Q4_K_M", "Q8_0", "F16", "AWQ", "4BIT"; None: unquantised or unknown
    # Ollama's digest of the model (its manifest: the weights with their template and parameters), the
    # sha256 of a GGUF file where an engine reports one. Never computed here, and no part of either key.
    digest: _Digest | None = None
    why: _Why = ()  # which reported fields it came from

    def entry_key(self) -> tuple[str, str, str | None, str | None]:
        """One model, whatever its quantization: what one catalog entry groups."""
        return (self.family, self.size, self.variant, self.revision)

    def weights_key(self) -> tuple[str, str, str | None, str | None, str | None, str | None]:
        """The same weights: the entry's key, the format and the quantization."""
        return (*self.entry_key(), self.format, self.quantization)

    def entry_name(self) -> str:
        """The entry's own id where its holders call it differently: its most specific Ollama-style name."""
        ollama = _ollama_names(self)
        return ollama[-1] if ollama else self.names()[0]

    def names(self) -> tuple[str, ...]:
        """Every name a user may know this entry by (any quantization), in ``name_key`` form."""
        return tuple(dict.fromkeys((*_ollama_names(self), *_hf_names(self))))

    def weights_names(self) -> tuple[str, ...]:
        """Names that also say the quantization (an Ollama tag, a GGUF file stem), in ``name_key`` form."""
        q = self.quantization
        if q is None:
            return ()
        ollama = _ollama_names(self)
        out = [f"{ollama[-1]}-{_OLLAMA_QUANT.get(q, q).lower()}"] if ollama else []
        return tuple(out + [f"{n}-{q.lower()}" for n in _hf_names(self)])


def name_key(name: str) -> str:
    """How a name is compared with ``names()``: lowercase, without a path or an organisation,
    ``.gguf`` or ``:latest``."""
    tail = name.strip().replace("\\", "/").rsplit("/", 1)[-1].lower()
    tail = tail.removesuffix(":latest")
    return tail[: -len(".gguf")] if tail.endswith(".gguf") else tail


# -- what is known of the families -------------------------------------------------------------------


class _Facts(NamedTuple):
    """What is known of one family (a family not listed here is never identified)."""

    sizes: str  # the sizes it comes in: a parameter count snaps to the nearest
    archs: str  # the GGUF architectures engines report for it (spelt without ``_``, ``-``, ``.``)
    hf: str = ""  # how Hugging Face repo names spell it, lowercase ("llama-3.2"); "": as the family
    ollama: str = ""  # the size its bare Ollama library name stands for ("llama3.2": 3b); "": none known
    # Its Ollama library tags name instruct models unless they say "text". False: Ollama's plain tags are
    # what the family's plain names are elsewhere (Qwen3's hybrid models), their variant unknown.
    chat: bool = True


_KNOWN: dict[str, _Facts] = {
    "llama2": _Facts("7b 13b 70b", "llama", "llama-2", "7b"),
    "llama3": _Facts("8b 70b", "llama", "meta-llama-3", "8b"),
    "llama3.1": _Facts("8b 70b 405b", "llama", "llama-3.1", "8b"),
    "llama3.2": _Facts("1b 3b 11b 90b", "llama mllama", "llama-3.2", "3b"),
    "llama3.3": _Facts("70b", "llama", "llama-3.3", "70b"),
    "codellama": _Facts("7b 13b 34b 70b", "llama", "", "7b"),
    "tinyllama": _Facts("1.1b", "llama", "", "1.1b"),
    "qwen1.5": _Facts("0.5b 1.8b 4b 7b 14b 32b 72b 110b", "qwen2", chat=False),
    "qwen2": _Facts("0.5b 1.5b 7b 72b", "qwen2 qwen2vl", "", "7b"),
    "qwen2.5": _Facts("0.5b 1.5b 3b 7b 14b 32b 72b", "qwen2 qwen2vl qwen25vl", "", "7b"),
    "qwen3": _Facts("0.6b 1.7b 4b 8b 14b 32b", "qwen3", chat=False),  # its plain names are the chat models
    "smollm": _Facts("135m 360m 1.7b", "llama", "", "1.7b"),
    "smollm2": _Facts("135m 360m 1.7b", "llama", "", "1.7b"),
    "mistral": _Facts("7b", "llama mistral", "", "7b"),
    "mistral-nemo": _Facts("12b", "llama mistral", "", "12b"),
    "mistral-small": _Facts("22b 24b", "llama mistral mistral3", chat=False),
    "mistral-large": _Facts("123b", "llama mistral", chat=False),
    "mixtral": _Facts("8x7b 8x22b", "llama mixtral", "", "8x7b"),
    "gemma": _Facts("2b 7b", "gemma", "", "7b"),
    "gemma2": _Facts("2b 9b 27b", "gemma2", "gemma-2", "9b"),
    "gemma3": _Facts("270m 1b 4b 12b 27b", "gemma3", "gemma-3", "4b"),
    "codegemma": _Facts("2b 7b", "gemma"),
    "phi2": _Facts("2.7b", "phi2", "phi-2", chat=False),
    "phi3": _Facts("3.8b 7b 14b", "phi3", "phi-3", "3.8b"),
    "phi3.5": _Facts("3.8b", "phi3", "phi-3.5", "3.8b"),
    "phi4": _Facts("3.8b 14b", "phi3", "phi-4", "14b"),
}


def _facts(family: str) -> _Facts:
    """What is known of ``family`` (nothing, for one a peer names that this node does not know)."""
    return _KNOWN.get(family) or _Facts("", "", chat=False)


# Where a family name starts a model name (the hyphen-joined tokens); ``v`` is its version. Tried in order.
_FAMILY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern + r"(?=-|\Z)", re.ASCII), name)
    for pattern, name in (
        (r"codellama", "codellama"),
        (r"tinyllama", "tinyllama"),
        (r"(?:meta-)?llama-?(?P<v>[1-4](?:\.[0-9])?)", "llama{v}"),
        (r"qwen-?(?P<v>[1-3](?:\.[0-9])?)", "qwen{v}"),
        (r"smollm(?P<v>[1-3]?)", "smollm{v}"),
        (r"mistral-(?P<v>nemo|small|large)", "mistral-{v}"),
        (r"mistral", "mistral"),
        (r"mixtral", "mixtral"),
        (r"codegemma", "codegemma"),
        (r"gemma-?(?P<v>[1-3]?)", "gemma{v}"),
        (r"phi-?(?P<v>[1-4](?:\.[0-9])?)", "phi{v}"),
    )
)
# How Ollama tags spell a quantization (``llama3.2:3b-instruct-q4_K_M``), where it is not the canonical name.
_OLLAMA_QUANT = {"F16": "fp16", "F32": "fp32", "BF16": "bf16"}
# Phi's sizes by name.
_SIZE_WORDS = {"mini": "3.8b", "small": "7b", "medium": "14b"}
_SIZE_WORD_FAMILIES = frozenset({"phi3", "phi3.5", "phi4"})

# -- tokens --------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"[\s_:\-]+|(?<![0-9])\.|\.(?![0-9])", re.ASCII)
_SIZE = re.compile(r"(?:([0-9]{1,2})x)?([0-9]{1,4}(?:\.[0-9]{1,3})?)([mbt])", re.ASCII)
_QSTART = re.compile(r"i?q[1-8]|tq[12]", re.ASCII)
_QPART = frozenset({"k", "m", "s", "l", "xl", "xs", "xxs", "xss", "0", "1", "nl"})
_QWORDS = frozenset(
    {"awq", "gptq", "fp8", "int4", "int8", "w4a16", "w8a8", "w8a16", "dynamic", "mxfp4", "nvfp4"}
    | {f"{n}bit" for n in (2, 3, 4, 5, 6, 8)}
)
_FLOATS = {"f16": "F16", "fp16": "F16", "f32": "F32", "fp32": "F32", "bf16": "BF16"}
_TUNING = {"instruct": "instruct", "chat": "instruct", "it": "instruct", "base": "base", "text": "base", "pt": "base"}
_SPECIALTY = {"coder": "coder", "vision": "vision", "vl": "vision", "math": "math"}
_NOISE = frozenset({"hf", "gguf", "ggml", "mlx", "latest"})
_REVISION = re.compile(r"v[0-9]{1,2}(?:\.[0-9]{1,2}){0,2}|[0-9]{4}|[0-9]{1,4}k", re.ASCII)
_PRINTABLE = re.compile(r"[\x20-\x7e]+", re.ASCII)


class _Said(NamedTuple):
    """What one name says."""

    family: str | None = None
    size: str | None = None
    tuning: str | None = None  # instruct | base
    specialties: frozenset[str] = frozenset()
    quantization: str | None = None
    revision: str | None = None


def _text(value: object) -> str | None:
    """A reported string worth reading: printable ASCII, not empty, not too long."""
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        return None
    value = value.strip()
    return value if value and _PRINTABLE.fullmatch(value) else None


def _tail(name: str) -> str:
    """The last part of a path or repo id, without ``.gguf`` (``hf.co/org/Model-GGUF:Q4_K_M`` keeps its tag)."""
    tail = name.replace("\\", "/").rsplit("/", 1)[-1]
    return tail[: -len(".gguf")] if tail.lower().endswith(".gguf") else tail


def _number(text: str) -> str:
    """``1.50`` -> ``1.5``, ``3.0`` -> ``3``."""
    return text.rstrip("0").rstrip(".") if "." in text else text


def _canonical_size(experts: str | None, value: str, unit: str) -> str | None:
    """``0.5b`` and ``500m`` are both ``0.5b``; ``135m`` stays; ``8x7b`` stays."""
    if experts is not None:
        return f"{int(experts)}x{_number(value)}{unit}"
    params = float(value) * {"m": 1e6, "b": 1e9, "t": 1e12}[unit]
    if not 1e5 <= params <= 1e13:
        return None
    return _label_of(params)


def _label_of(params: float) -> str:
    millions = round(params / 1e6, 3)
    if params >= 1e9 or millions % 100 == 0:
        return f"{_number(f'{params / 1e9:.3f}')}b"
    return f"{_number(f'{millions:.3f}')}m"


def _nominal(size: str) -> float:
    """A size label as a parameter count (``8x7b``: 56 billion)."""
    m = _SIZE.fullmatch(size)
    if m is None:
        return 0.0
    experts, value, unit = m.groups()
    return (int(experts) if experts else 1) * float(value) * {"m": 1e6, "b": 1e9, "t": 1e12}[unit]


def _quant_tokens(tokens: list[str], at: int) -> tuple[str | None, int]:
    """The quantization that starts at ``tokens[at]`` and how many tokens it takes (0: none starts there)."""
    tok = tokens[at]
    if tok in _FLOATS:
        return _FLOATS[tok], 1
    if _QSTART.fullmatch(tok):
        parts = [tok]
        while at + len(parts) < len(tokens) and tokens[at + len(parts)] in _QPART and len(parts) < 4:
            parts.append(tokens[at + len(parts)])
        quant = "_".join(parts).upper()
        return ("IQ2_XXS" if quant == "IQ2_XSS" else quant), len(parts)
    if tok in _QWORDS:
        parts = [tok]
        while at + len(parts) < len(tokens) and tokens[at + len(parts)] in _QWORDS and len(parts) < 3:
            parts.append(tokens[at + len(parts)])
        return "_".join(parts).upper(), len(parts)
    return None, 0


def _family_of(tokens: list[str]) -> tuple[str, int] | None:
    """The known family the tokens start with, and how many tokens it takes."""
    joined = "-".join(tokens[:4])
    for rx, name in _FAMILY_RULES:
        m = rx.match(joined)
        if m is not None:
            family = name.format(v=m.groupdict().get("v") or "")
            return (family, m.group(0).count("-") + 1) if family in _KNOWN else None
    return None


def _parse(name: str | None) -> _Said | None:
    """What a name says, or None if it starts with no known family or has a word this module does not know."""
    text = _text(name)
    if text is None:
        return None
    tokens = [t for t in _SPLIT.split(_tail(text).lower()) if t]
    if not tokens or len(tokens) > 16:
        return None
    found = _family_of(tokens)
    if found is None:
        return None
    return _read_rest(found[0], tokens, found[1])


def _read_rest(family: str, tokens: list[str], at: int) -> _Said | None:
    """Read the tokens after the family; None at the first unknown word or a contradiction."""
    size = tuning = quant = None
    specialties: set[str] = set()
    revisions: list[str] = []
    while at < len(tokens):
        tok = tokens[at]
        q, taken = _quant_tokens(tokens, at)
        if taken:
            if quant is not None and quant != q:
                return None
            quant, at = q, at + taken
            continue
        at += 1
        m = _SIZE.fullmatch(tok)
        word_size = _SIZE_WORDS.get(tok) if family in _SIZE_WORD_FAMILIES else None
        if m is not None or word_size is not None:
            got = _canonical_size(*m.groups()) if m is not None else word_size
            if got is None or (size is not None and size != got):
                return None
            size = got
        elif tok in _TUNING:
            if tuning is not None and tuning != _TUNING[tok]:
                return None
            tuning = _TUNING[tok]
        elif tok in _SPECIALTY:
            specialties.add(_SPECIALTY[tok])
        elif _REVISION.fullmatch(tok):
            if len(revisions) >= 3:
                return None
            revisions.append(tok)
        elif tok not in _NOISE:
            return None
    revision = "-".join(revisions) or None
    return _Said(family, size, tuning, frozenset(specialties), quant, revision)


# -- the evidence of one model -------------------------------------------------------------------------


def _cite(what: str, value: object) -> str:
    shown = value if isinstance(value, (int, float)) else _text(str(value)) or "?"
    shown = str(shown)
    if len(shown) > _CITE_MAX:
        shown = shown[:_CITE_MAX] + "..."
    return f"{what}={shown}"


def _general(meta: ModelMeta) -> tuple[_Said, str] | None:
    """What the GGUF ``general.*`` keys say (Ollama's /api/show), and the words read: basename, size label
    and finetune as one name, else ``general.name``. None if they say nothing readable: they only confirm."""
    parts = (meta.basename, meta.size_label, meta.finetune) if _text(meta.basename) else ()
    for words in (" ".join(filter(None, map(_text, parts))), _text(meta.general_name)):
        said = _parse(words)
        if said is not None and words:
            return said, words
    return None


def _agree(a: _Said, b: _Said) -> _Said | None:
    """``a`` with what ``b`` adds; None where they contradict (family, size, tuning)."""
    for x, y in ((a.family, b.family), (a.size, b.size), (a.tuning, b.tuning)):
        if x is not None and y is not None and x != y:
            return None
    return _Said(
        family=a.family or b.family,
        size=a.size or b.size,
        tuning=a.tuning or b.tuning,
        specialties=a.specialties | b.specialties,
        quantization=a.quantization or b.quantization,
        revision=a.revision or b.revision,
    )


def _counted(meta: ModelMeta) -> tuple[float, str] | None:
    """The parameter count the engine reported, and where it said it."""
    n = meta.n_params
    if isinstance(n, int) and not isinstance(n, bool) and 10**5 <= n <= 10**13:
        return float(n), _cite("n_params", n)
    text = _text(meta.parameter_size)
    if text is not None:
        m = re.fullmatch(r"([0-9]{1,4}(?:\.[0-9]{1,3})?)([KMBT])", text.upper(), re.ASCII)
        if m is not None:
            params = float(m.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]
            if params >= 1e5:
                return params, _cite("parameter_size", text)
    return None


def size_from_params(n: float, family: str | None = None) -> str | None:
    """The size label of a parameter count: the family's nearest size (134515008 is smollm2's ``135m``,
    3.21e9 llama3.2's ``3b``); for a family whose sizes are not known, the count rounded
    (``1.2b``, ``494m``). None when the family has no size near it."""
    if not (isinstance(n, (int, float)) and math.isfinite(n) and 1e5 <= n <= 1e13):
        return None
    facts = _KNOWN.get(family or "")
    if facts is None:
        return _label_of(float(f"{n:.2g}") if n >= 1e9 else max(round(n, -6), 1e6))
    known = facts.sizes
    best = min(known.split(), key=lambda s: abs(math.log(n / _nominal(s))))
    return best if 0.7 <= n / _nominal(best) <= 1.45 else None


def _arch_ok(family: str, meta: ModelMeta) -> bool:
    """Whether every architecture the engine reports is one this family is built as."""
    allowed = frozenset(_facts(family).archs.split())
    reported = [a for a in (_text(meta.architecture), *(_text(f) for f in meta.families[:8])) if a]
    return all(re.sub(r"[_\-.]", "", a.lower()) in allowed for a in reported)


def architecture_of(family: str | None) -> str | None:
    """The GGUF architecture a family is built as (``llama3.2``: ``llama``), where this module knows it."""
    facts = _KNOWN.get(family or "")
    return facts.archs.split()[0] if facts is not None else None


def _quant_of(value: str | int | None) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return _FILE_TYPES.get(value)
    return normalise_quantization(value) if isinstance(value, str) else None


# llama.cpp's ``llama_ftype`` numbers, as GGUF ``general.file_type`` carries them.
_FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}  # fmt: skip
_FTYPE_SUFFIX = {"small": "s", "medium": "m", "large": "l", "extra small": "xs"}
_FTYPE = re.compile(r"((?:i|t)?q[0-9]_[a-z0-9_]+)\s*-\s*(.+)", re.ASCII)


def normalise_quantization(value: str | None) -> str | None:
    """A quantization as any engine spells it, in one spelling: ``q4_K_M``, ``Q4_K - Medium`` (llama.cpp's
    ftype), ``mostly Q4_K - Medium`` (older builds) are ``Q4_K_M``; ``fp16`` is ``F16``; ``4bit``
    ``4BIT``; ``MXFP4 MoE`` ``MXFP4``. None for what it cannot read."""
    text = _text(value)
    if text is None or len(text) > 64:
        return None
    text = text.lower().removesuffix("(guessed)").strip()
    text = text.removeprefix("mostly ").removeprefix("all ").removesuffix(" moe").strip()
    m = _FTYPE.fullmatch(text)
    if m is not None:
        base, desc = m.groups()
        if desc in _FTYPE_SUFFIX and base.endswith("_k"):
            if base == "q2_k" and desc == "medium":  # LLAMA_FTYPE_MOSTLY_Q2_K's name: Ollama says Q2_K
                return "Q2_K"
            text = f"{base}_{_FTYPE_SUFFIX[desc]}"
        elif re.match(r"[0-9.]+ bpw", desc):
            text = base
        else:
            return None
    tokens = [t for t in re.split(r"[\s_\-]+", text) if t]
    if not tokens:
        return None
    quant, taken = _quant_tokens(tokens, 0)
    return quant if taken == len(tokens) else None


def parameter_label(n: int | None) -> str | None:
    """A parameter count as Ollama shows it (``format.HumanNumber``): ``3.2B``, ``134.52M``, ``8B``."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 10**15:
        return None
    for scale, unit, places in ((1e12, "T", 1), (1e9, "B", 1), (1e6, "M", 2)):
        if n >= scale:
            x = n / scale
            return f"{x:.0f}{unit}" if x == math.floor(x) else f"{x:.{places}f}{unit}"
    return f"{n / 1e3:.0f}K" if n >= 1000 else str(n)


_KIND_FORMAT = {"llamacpp": "gguf", "ollama": "gguf", "mlx": "mlx"}
_HF_KINDS = frozenset({"vllm", "sglang", "tgi"})
_FORMATS = {"gguf": "gguf", "mlx": "mlx", "safetensors": "safetensors"}


def _format(kind: str, model_id: str, meta: ModelMeta) -> str | None:
    said = _text(meta.format)
    if said is not None:
        return _FORMATS.get(said.lower())
    if any(n.lower().endswith(".gguf") for n in (model_id, meta.path or "")):
        return "gguf"
    return "safetensors" if kind in _HF_KINDS else _KIND_FORMAT.get(kind)


def _digest(value: str | None) -> str | None:
    text = _text(value)
    if text is None:
        return None
    text = text.lower().removeprefix("sha256:")
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def _variant(tuning: str | None, specialties: frozenset[str]) -> str | None:
    parts = sorted(specialties) + ([tuning] if tuning else [])
    return "-".join(parts) or None


class _Found(NamedTuple):
    said: _Said
    why: list[str]


def _names_say(model_id: str, meta: ModelMeta) -> _Found | None:
    """What the model's names say together: its id, else the file or repo the engine loaded (an alias
    such as llama.cpp's ``--alias`` or vLLM's ``--served-model-name``), then the GGUF ``general.*`` keys.
    None if no name says a family, or two contradict."""
    said = _parse(model_id)
    why = [_cite("id", model_id)]
    path = _text(meta.path)
    if path is not None and _tail(path) != _tail(model_id):
        other = _parse(path)
        if said is None:
            said, why = other, [_cite("path", path)]
        elif other is not None:
            said = _agree(said, other)
            why.append(_cite("path", path))
    if said is None:
        return None
    general = _general(meta)
    if general is not None:
        said = _agree(said, general[0])
        why.append(_cite("general", general[1]))
    return _Found(said, why) if said is not None and said.family else None


def _size(said: _Said, meta: ModelMeta, why: list[str]) -> str | None:
    """The size the names say, checked against a reported parameter count; else the count's."""
    family = said.family or ""
    counted = _counted(meta)
    if said.size is not None:
        if counted is not None and not 0.6 <= counted[0] / _nominal(said.size) <= 1.6:
            return None  # a name and a count that disagree: one of them is wrong
        if counted is not None:
            why.append(counted[1])
        return said.size
    if counted is None:
        return None
    size = size_from_params(counted[0], family)
    if size is not None:
        why.append(f"{counted[1]} -> {size}")
    return size


def _tuning(kind: str, model_id: str, said: _Said, why: list[str]) -> str | None:
    """The names' tuning; for an Ollama library model whose tag names none, instruct (its default tags)."""
    if said.tuning is not None:
        return said.tuning
    if kind == "ollama" and "/" not in model_id and _facts(said.family or "").chat:
        why.append("ollama library tag: instruct")
        return "instruct"
    return None


def _quantization(said: _Said, meta: ModelMeta, why: list[str]) -> str | None:
    """The names' quantization (a file's name is the more specific: Q4_K_L is ftype Q4_K_M), else the engine's."""
    reported = _quant_of(meta.ftype) or _quant_of(meta.quantization)
    if reported is not None:
        why.append(_cite("quantization", reported))
    return said.quantization or reported


def _well_formed(meta: ModelMeta) -> bool:
    """Whether every fact the engine reported is one worth reading: an engine that sends control
    characters, odd unicode or a parameter count no model has is no witness of which model it holds."""
    texts = [
        meta.path,
        meta.architecture,
        meta.basename,
        meta.size_label,
        meta.finetune,
        meta.general_name,
        meta.parameter_size,
        meta.quantization,
        meta.format,
        meta.digest,
        meta.ftype if not isinstance(meta.ftype, int) else None,
        *meta.families,
    ]
    if len(meta.families) > 16 or any(t and _text(t) is None for t in texts):
        return False
    counts = (meta.n_params, meta.ftype if isinstance(meta.ftype, int) else None)
    return all(c is None or 0 <= c <= 10**13 for c in counts)


def identify(kind: str, model_id: str, meta: ModelMeta) -> Lineage | None:
    """The lineage of the model ``model_id`` on an engine of ``kind``, from what the engine reported;
    None when its family or size cannot be told with confidence (it then stays its own model)."""
    if meta.adapter_of or _text(model_id) is None or not _well_formed(meta):
        return None
    found = _names_say(model_id, meta)
    if found is None:
        return None
    said, why = found
    family = said.family
    if family is None or not _arch_ok(family, meta):
        return None
    if meta.architecture:
        why.append(_cite("architecture", meta.architecture))
    size = _size(said, meta, why)
    if size is None:
        return None
    tuning = _tuning(kind, model_id, said, why)
    quant = _quantization(said, meta, why)
    return Lineage(
        family=family,
        size=size,
        variant=_variant(tuning, said.specialties),
        revision=said.revision,
        format=_format(kind, model_id, meta),
        quantization=quant,
        digest=_digest(meta.digest),
        why=tuple(why[:_WHY_MAX]),
    )


def details_of(meta: ModelMeta, lineage: Lineage | None) -> tuple[str | None, str | None, str | None]:
    """What Ollama's ``details`` would say of a model: its architecture (Ollama's ``family``), its
    parameter size and its quantization level; from what the engine reported, else from its lineage."""
    family = _text(meta.architecture) or (architecture_of(lineage.family) if lineage is not None else None)
    size = _text(meta.parameter_size) or parameter_label(meta.n_params)
    if size is None and lineage is not None:
        size = lineage.size.upper().replace("X", "x")
    quant = _quant_of(meta.quantization) or _quant_of(meta.ftype) or (lineage.quantization if lineage else None)
    if quant is None:  # a word this module does not read: as the engine wrote it
        quant = _text(meta.quantization) or (_text(meta.ftype) if isinstance(meta.ftype, str) else None)
    return family, size, quant


# -- the names of an entry -----------------------------------------------------------------------------


def _split(variant: str | None) -> tuple[str | None, list[str]]:
    parts = variant.split("-") if variant else []
    tuning = parts[-1] if parts and parts[-1] in ("instruct", "base") else None
    return tuning, [p for p in parts if p not in ("instruct", "base")]


def _ollama_names(lin: Lineage) -> list[str]:
    """Ollama library names (``llama3.2``, ``llama3.2:3b``, ``mistral:7b-instruct-v0.3``), the full tag last."""
    tuning, specs = _split(lin.variant)
    if tuning is None or (lin.revision and not lin.revision.startswith("v")):
        return []  # Ollama's tags name no context variant (Phi's 4k, 128k)
    name = lin.family + "".join(f"-{s}" for s in specs)
    rev = f"-{lin.revision}" if lin.revision else ""
    if tuning == "base":
        return [f"{name}:{lin.size}-text{rev}"]
    out = [] if rev else [f"{name}:{lin.size}"]
    if not rev and not specs and _facts(lin.family).ollama == lin.size:
        out.insert(0, name)
    out.append(f"{name}:{lin.size}-instruct{rev}")
    return out


def _hf_names(lin: Lineage) -> list[str]:
    tuning, specs = _split(lin.variant)
    stem = _facts(lin.family).hf or lin.family
    word = {"instruct": "it" if lin.family.startswith("gemma") else "instruct", "base": "base"}.get(tuning or "")
    tail = "".join(f"-{p}" for p in (word, lin.revision) if p)
    spec = "".join(f"-{s}" for s in specs)
    out = [f"{stem}{spec}-{lin.size}{tail}"]
    if spec:
        out.append(f"{stem}-{lin.size}{spec}{tail}")
    return out
