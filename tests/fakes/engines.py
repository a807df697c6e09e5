"""Fake local LLM engines for Quorum's tests: real aiohttp servers on 127.0.0.1.

Each fake speaks one engine's exact HTTP wire format, quirks included, as
described in `reference/engines.md`.  Start one with::

    eng = await start_fake("tgi", token_delay_s=0.01)
    try:
        ...  # talk to eng.url (no trailing slash, no /v1)
    finally:
        await eng.close()

Knobs (`tokens`, `token_delay_s`, `first_token_delay_s`, `fail_after_tokens`,
`fail_mode`, `next_status`, `status_always`, `redirect_status`,
`redirect_location`, `refuse`, `endless`, `malformed_payload`, `loading`,
`api_key`, `tool_arguments`, `context_length`, `train_context_length`,
`embedding_dim`, `loaded_models`, `omit_usage` (the `/v1` fakes: no usage on whole
answers, no usage chunk in streams), `native_apis` (llama.cpp: its own `/v1/responses`
and `/v1/messages`; False, set before start: a build without them), `messages_start`
(llama.cpp: False leaves out a Messages stream's first event), `forged_event_type` (llama.cpp: appended
to the `type` of its Responses text deltas after the first, a hostile engine's injection), and what the
engines report of their models' weights: `facts` (Ollama: `/api/tags` details and `/api/show` GGUF keys per
model), `model_meta` and `model_path` (llama.cpp: `/v1/models` `meta` per model; the file `/props` names,
as under `--alias`), `model_facts` (LM Studio: arch, quantization, format), `roots` and `lora_parents`
(vLLM: `--served-model-name` paths; LoRA adapters' cards)) are plain
attributes that tests may change at any time; bookkeeping (`requests`, `cancelled`, `abandoned`,
`active_streams`) is read the same way.

Faults (every kind; Ollama's native NDJSON too, with lines for events):

- `fail_after_tokens=N` says where a generation goes wrong (after N content
  chunks; None: never), `fail_mode` how.  Streamed / non-streamed:
  "error" (default) in-band error event / the engine's 500;
  "drop" abort mid-body / 500;
  "rst" RST (SO_LINGER 0) after the N chunks were read / RST, no answer;
  "fin" clean TCP close mid-body, no [DONE] / FIN, no answer;
  "eof" the body ends properly but early, no finish chunk, no [DONE] / 200 empty;
  "stall" nothing more, connection open until the client leaves (counted in
  `cancelled` / `abandoned`) / 200 headers, no body;
  "malformed_json" one `data: {"choices": [` event, then the rest of the
  stream / 200 `{"choices": [`;
  "malformed_shape" one `{"choices":[1],"usage":{"prompt_tokens":1}}` event,
  then the rest / 200 `{"choices": 5}`.
  `malformed_payload` (a string, or a list for several events) replaces the
  malformed data, e.g. `'{"choices":"x"}'`.  With N=0 the new modes strike right
  after the headers, before SSE comments and the role chunk: "stall" is then
  "200 then nothing", "malformed_json" the very first event.  ("error" and
  "drop" at 0 still come after the role chunk, as they always did.)
- `next_status=503` once, `status_always=503` on every generation request until
  set back to None; both in the engine's own error envelope.
- `redirect_status=307` (or 302): every generation request is answered with it,
  `Location: redirect_location` (default: the same path on 127.0.0.1:9) and
  `{"moved": true}`.
- `refuse=True` at start, or `await eng.set_refuse(True)`: bound but not
  listening (connection refused); `await eng.set_refuse(False)` listens again.
  (The plain attribute on a listening fake RSTs each new request instead.)
- `endless=True`: streams never finish; the planned tokens repeat every
  `token_delay_s` until the client goes away (counted in `cancelled`); a
  non-streamed request never gets its answer.

For faults in the network itself (latency, bandwidth, stalls, resets between
any two parties) put a `tests.faults.FaultProxy` in front of the fake.
Module map: `base` (server, knobs, bookkeeping) ← `openai_compat` (the shared
`/v1` surface and the "openai" kind) ← one module per engine.
"""

from __future__ import annotations

from typing import Any

from tests.fakes.base import EngineError, FakeEngine, RecordedRequest
from tests.fakes.llamacpp import LlamaCppEngine
from tests.fakes.lmstudio import LMStudioEngine
from tests.fakes.localai import LocalAIEngine
from tests.fakes.mlx import MLXEngine
from tests.fakes.ollama import OllamaEngine
from tests.fakes.openai_compat import OpenAICompatEngine
from tests.fakes.tgi import TGIEngine
from tests.fakes.vllm_sglang import SGLangEngine, VLLMEngine

__all__ = ["ENGINE_CLASSES", "KINDS", "EngineError", "FakeEngine", "RecordedRequest", "start_fake"]

KINDS = ("ollama", "llamacpp", "vllm", "sglang", "tgi", "lmstudio", "localai", "mlx", "openai")

ENGINE_CLASSES: dict[str, type[FakeEngine]] = {
    "ollama": OllamaEngine,
    "llamacpp": LlamaCppEngine,
    "vllm": VLLMEngine,
    "sglang": SGLangEngine,
    "tgi": TGIEngine,
    "lmstudio": LMStudioEngine,
    "localai": LocalAIEngine,
    "mlx": MLXEngine,
    "openai": OpenAICompatEngine,
}


async def start_fake(
    kind: str, *, port: int = 0, host: str = "127.0.0.1", models: list[str] | None = None, **knobs: Any
) -> FakeEngine:
    """Start a fake `kind` engine on `host:port` (0: any free port, read back into `.port`).

    `knobs` set attributes before the server starts; an unknown name is a TypeError.
    With `loading=True`, vLLM and TGI start bound but not listening (connection
    refused) until `await eng.set_loading(False)`.
    """
    try:
        cls = ENGINE_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {KINDS}") from None
    eng = cls(host=host, models=models)
    for name, value in knobs.items():
        if name.startswith("_") or not hasattr(eng, name):
            raise TypeError(f"start_fake() got an unknown knob {name!r} for {kind}")
        setattr(eng, name, value)
    listen = not (eng.loading and eng.loading_mode == "refuse")
    try:
        await eng.start(port=port, listen=listen)
    except BaseException:
        await eng.close()
        raise
    return eng
