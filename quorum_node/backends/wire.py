"""What engines send, as typed structures: decoded once, checked on the way in.

Everything an engine (or a peer) sends is untrusted input. Each message is
decoded by a module-level ``Decoder`` into a Struct that names only the fields
quorum reads, with the types the OpenAI SDK (or our own code) relies on; every
other field is skipped, though still checked to be well-formed JSON. A message
that does not fit is *malformed*, and the callers turn that into the
documented failure (the engine is unavailable, the stream broke, the fact is
ignored), never into an exception nobody expected.

Pure logic: bytes in, Structs (or None) out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Raw, Struct

__all__ = [
    "Chunk",
    "Completion",
    "EmbeddingAnswer",
    "ErrorInfo",
    "Malformed",
    "Count",
    "CardFacts",
    "GgufGeneral",
    "LlamaProps",
    "LmsFacts",
    "ModelCard",
    "OllamaTagFacts",
    "Usage",
    "decode",
    "decode_answer",
    "decode_chunk",
    "decode_embeddings",
    "decode_entries",
    "decode_entry",
    "gguf_general",
    "parse_error",
]

Malformed = (msgspec.DecodeError, msgspec.ValidationError)
"""What the decoders below raise for input that does not fit."""

Count = Annotated[int, msgspec.Meta(ge=0)]
#: A string an engine reports about a model (a path, an architecture, a quantization): bounded.
Text = Annotated[str, msgspec.Meta(max_length=512)]


class _In(Struct, frozen=True, kw_only=True, gc=False):
    """Base of every inbound message: unknown fields are skipped.

    Each subclass repeats ``frozen=True``: msgspec inherits it at run time, but a
    type checker reads a ``dataclass_transform`` class's own keywords only
    (PEP 681; msgspec issue #657), and would take the subclass for a mutable one.
    """


# -- generation ------------------------------------------------------------


class Usage(_In, frozen=True):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0


class FunctionCall(_In, frozen=True):
    name: str | None = None
    arguments: str | None = None  # a JSON *string*, as the SDK hands it on


class ToolCall(_In, frozen=True):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: FunctionCall | None = None


class Delta(_In, frozen=True):
    role: str | None = None
    content: str | None = None
    # The model's reasoning (llama.cpp, vLLM: reasoning_content; Ollama's /v1, LM Studio: reasoning), which
    # the Ollama surface writes as "thinking". Not part of OpenAI's chunk: whatever it is passes unchecked.
    reasoning_content: Any = None
    reasoning: Any = None
    tool_calls: list[ToolCall] | None = None


class ChunkChoice(_In, frozen=True):
    index: int = 0
    delta: Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class Chunk(_In, frozen=True):
    """One streamed event: a ``chat.completion.chunk`` / ``text_completion`` (or an error).

    The one declaration of an OpenAI chunk: the stream normaliser checks each
    event from an engine or a peer with it (``sse.py``), and the surfaces that
    re-encode the checked events read them with it (``api/chunks.py``,
    ``api/ollama_wire.py``).
    """

    id: str | None = None
    object: str | None = None
    created: int | float | None = None
    choices: list[ChunkChoice] | None = None
    usage: Usage | None = None
    error: Any = None


class Message(_In, frozen=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class AnswerChoice(_In, frozen=True):
    index: int = 0
    message: Message | None = None
    text: str | None = None
    finish_reason: str | None = None


class Completion(_In, frozen=True):
    """A whole chat or text completion (or an error answered with HTTP 200)."""

    object: str | None = None
    choices: list[AnswerChoice] | None = None
    usage: Usage | None = None
    error: Any = None


class EmbeddingItem(_In, frozen=True):
    embedding: list[float] | str  # floats, or base64 of packed float32
    index: int = 0


class EmbeddingAnswer(_In, frozen=True):
    object: str | None = None
    data: list[EmbeddingItem] | None = None
    usage: Usage | None = None
    error: Any = None


decode_chunk = msgspec.json.Decoder(Chunk).decode
decode_answer = msgspec.json.Decoder(Completion).decode
decode_embeddings = msgspec.json.Decoder(EmbeddingAnswer).decode


# -- errors ----------------------------------------------------------------


class _ErrorDetail(_In, frozen=True):
    message: str | None = None
    msg: str | None = None
    detail: str | None = None
    type: str | None = None
    param: Any = None
    code: Any = None
    http_status_code: int | None = None  # TGI, mid-stream


class _ErrorBody(_In, frozen=True):
    """Every engine's error envelope (engines.md §12.10), in one shape."""

    error: _ErrorDetail | str | None = None
    object: str | None = None  # "error": the flat vLLM / SGLang shape
    message: str | None = None
    detail: Any = None  # FastAPI
    type: str | None = None
    param: Any = None
    code: Any = None


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


class ErrorInfo(Struct, frozen=True, kw_only=True):
    """A well-formed error an engine answered: the parts we pass on."""

    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None
    status: int | None = None  # an HTTP status the body itself names, if any


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _status(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 else None


def parse_error(raw: bytes) -> ErrorInfo | None:
    """The error inside an engine's answer, or None if ``raw`` is no well-formed error body."""
    if not raw:
        return None
    try:
        body = _decode_error(raw)
    except Malformed:
        return None
    err = body.error
    if isinstance(err, str):
        return ErrorInfo(message=err, type=_str(body.type)) if err else None
    if isinstance(err, _ErrorDetail):
        message = err.message or err.msg or err.detail
        if not message:
            return None
        return ErrorInfo(
            message=message,
            type=_str(err.type),
            param=_str(err.param),
            code=_str(err.code),
            status=_status(err.code) or _status(err.http_status_code),
        )
    if body.object == "error" and body.message:
        return ErrorInfo(
            message=body.message,
            type=_str(body.type),
            param=_str(body.param),
            code=_str(body.code),
            status=_status(body.code),
        )
    if isinstance(body.detail, str) and body.detail:
        return ErrorInfo(message=body.detail)
    return None


# -- model lists and engine facts ---------------------------------------------


class ModelList(_In, frozen=True):
    """``GET /v1/models``: entries are decoded one by one, so one bad entry costs only itself."""

    data: list[Raw] | None = None  # Ollama sends null when empty
    error: Any = None  # LM Studio answers errors with HTTP 200


class CardMeta(_In, frozen=True):
    n_ctx: Count | None = None
    n_ctx_train: Count | None = None


class ModelCard(_In, frozen=True):
    id: str
    owned_by: str | None = None
    created: int | None = None
    max_model_len: Count | None = None
    meta: CardMeta | None = None


class LlamaMeta(_In, frozen=True):
    """llama.cpp's ``meta`` of a ``/v1/models`` entry: what lineage reads (engines.md §5, §14)."""

    n_params: Count | None = None
    size: Count | None = None  # bytes of the weights
    ftype: Text | None = None  # "Q4_1", "Q4_K - Medium" (newer builds)


class CardFacts(_In, frozen=True):
    """What a ``/v1/models`` entry says of the weights, decoded apart from ``ModelCard``: a malformed
    fact costs only the model's lineage. llama.cpp's ``meta``; vLLM's and SGLang's ``root`` (the
    model path) and ``parent`` (set on a LoRA adapter's card: the base model's name)."""

    meta: LlamaMeta | None = None
    root: Text | None = None
    parent: Text | None = None


class LlamaProps(_In, frozen=True):
    """llama.cpp ``GET /props``: the file it loaded, and how many requests it serves at once."""

    model_path: Text | None = None
    total_slots: Count | None = None


class ModelId(_In, frozen=True):
    """What is left of a model card whose other fields are malformed."""

    id: str


class LmsModels(_In, frozen=True):
    data: list[Raw] | None = None


class LmsModel(_In, frozen=True):
    id: str
    type: str | None = None
    state: str | None = None
    max_context_length: Count | None = None
    loaded_context_length: Count | None = None


class LmsFacts(_In, frozen=True):
    """An LM Studio ``/api/v0/models`` entry's facts of the weights, decoded apart from ``LmsModel``."""

    id: str
    arch: Text | None = None  # "llama", "qwen2"
    quantization: Text | None = None  # "Q4_K_M", "4bit"
    compatibility_type: Text | None = None  # "gguf", "mlx"


class TgiInfo(_In, frozen=True):
    model_id: str | None = None
    max_total_tokens: Count | None = None


class ServerLoad(_In, frozen=True):  # vLLM /load
    server_load: Count


class Slot(_In, frozen=True):  # llama.cpp /slots
    is_processing: bool = False


class OllamaDetails(_In, frozen=True):
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None
    context_length: Count | None = None


class OllamaTag(_In, frozen=True):  # one /api/tags (or /api/ps) entry
    name: str | None = None
    model: str | None = None
    digest: str | None = None
    details: OllamaDetails | None = None
    capabilities: list[str] | None = None
    context_length: Count | None = None  # /api/ps: the runtime window


class _OllamaDetailsFacts(_In, frozen=True):
    format: Text | None = None
    families: Annotated[list[Text], msgspec.Meta(max_length=16)] | None = None


class OllamaTagFacts(_In, frozen=True):
    """An ``/api/tags`` entry's facts of the weights that ``OllamaTag`` does not read, decoded apart."""

    details: _OllamaDetailsFacts | None = None


class OllamaName(_In, frozen=True):
    name: str | None = None
    model: str | None = None


class OllamaList(_In, frozen=True):  # /api/tags and /api/ps
    models: list[Raw] | None = None


class OllamaShow(_In, frozen=True):
    model_info: dict[str, Raw] | None = None


class GgufGeneral(Struct, frozen=True, kw_only=True):
    """The GGUF keys of Ollama's ``/api/show`` ``model_info`` that say which model it is."""

    architecture: str | None = None
    basename: str | None = None
    size_label: str | None = None
    finetune: str | None = None
    name: str | None = None
    parameter_count: int | None = None
    file_type: int | None = None
    context_length: int | None = None  # the trained context: ``<architecture>.context_length``


def gguf_general(info: dict[str, Raw]) -> GgufGeneral:
    """The ``general.*`` keys of a ``model_info`` map, each checked on its own (a bad one is left out)."""

    def text(key: str) -> str | None:
        raw = info.get(f"general.{key}")
        return decode(raw, Text) if raw is not None else None

    def count(key: str) -> int | None:
        raw = info.get(key)
        return decode(raw, Count) if raw is not None else None

    arch = text("architecture")
    ctx = count(f"{arch}.context_length") if arch else None
    if ctx is None:  # else the first ``*.context_length`` that is a count
        for key, value in info.items():
            if key.endswith(".context_length") and (ctx := decode(value, Count)) is not None:
                break
    return GgufGeneral(
        architecture=arch,
        basename=text("basename"),
        size_label=text("size_label"),
        finetune=text("finetune"),
        name=text("name"),
        parameter_count=count("general.parameter_count"),
        file_type=count("general.file_type"),
        context_length=ctx,
    )


T = TypeVar("T")


def decode_entries(raws: Sequence[Raw], full: type[T], rest: type[Any] | None = None) -> list[Any]:
    """Decode each entry as ``full``; one that does not fit is decoded as ``rest`` or skipped."""
    out = (decode_entry(raw, full, rest) for raw in raws)
    return [e for e in out if e is not None]


def decode_entry(raw: Raw, full: type[T], rest: type[Any] | None = None) -> Any:
    """One entry as ``full``, else as ``rest``; None if it fits neither."""
    try:
        return _decoder(full)(raw)
    except Malformed:
        if rest is None:
            return None
        try:
            return _decoder(rest)(raw)
        except Malformed:
            return None


_DECODERS: dict[type[Any], Any] = {}


def _decoder(t: type[Any]) -> Any:
    d = _DECODERS.get(t)
    if d is None:
        d = _DECODERS[t] = msgspec.json.Decoder(t).decode
    return d


def decode(raw: bytes, t: type[T]) -> T | None:
    """``raw`` as a ``t``, or None if it is not one."""
    try:
        return _decoder(t)(raw)  # type: ignore[no-any-return]
    except Malformed:
        return None
