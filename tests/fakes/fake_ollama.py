"""A fake Ollama server, written from Ollama's API documentation (docs/api.md).

Ollama cannot be installed on these machines, so the adapter is tested against this Starlette
app instead. It keeps to the documented wire format: NDJSON streams (``application/x-ndjson``)
whose last line has ``done: true``, ``done_reason`` and the token counters; model names where a
missing tag means ``:latest``; ``{"error": "..."}`` bodies with Ollama's status codes (404
``model 'x' not found``, 400 for a bad request, gin's plain ``404 page not found`` for an unknown
path); an ``{"error": ...}`` line when a stream fails after its 200 header; models that load on
first use and then show in ``/api/ps`` until their ``keep_alive`` runs out (``0`` unloads,
a negative one keeps them for Go's largest duration, about 292 years); ``/api/show`` with
``capabilities`` and the GGUF ``model_info``; ``/api/pull`` streaming a manifest, each layer's
bytes, then "success" (the model is installed only once its manifest is written); ``DELETE
/api/delete``; embedding-only models that refuse ``/api/chat`` and ``/api/generate`` but load
through ``/api/embed``.

Switches for the tests: installed and loaded models, time to first token and between tokens, the
canned reply, "fail every request with status N", "drop the connection after K lines" and
"report an error after K lines"; for pulls, what the registry holds (a model's ``size`` is its
layers' bytes), the pace of progress lines and which pulls fail. Streams that the client
abandons before the end are counted in ``aborted_streams``: that is how a test proves a cancel
closed the stream on the server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import DropConnection, serve_in_thread

DEFAULT_REPLY = "The sky is blue because air scatters blue light more than red light."
ROLES = frozenset({"system", "user", "assistant", "tool"})
NDJSON = "application/x-ndjson"
DEFAULT_KEEP_ALIVE = timedelta(minutes=5)
# Go's time.Duration(math.MaxInt64), which Ollama uses for a negative keep_alive.
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
SERVER_TZ = timezone(timedelta(hours=-7))  # Ollama writes times in the server's local zone
SMALL_LAYERS = (("template", 1_482), ("license", 12_403), ("params", 96))
NOT_IN_REGISTRY = "pull model manifest: file does not exist"


@dataclass
class FakeModel:
    """One model, as ``/api/tags``, ``/api/show``, ``/api/ps`` and ``/api/pull`` describe it.

    ``size`` is the bytes on disk: a weights layer plus three small ones when pulled.
    ``revision`` changes the digest, as a re-pulled newer version would.
    """

    name: str
    size: int = 1_321_098_329
    family: str = "llama"
    parameter_size: str = "1.2B"
    quantization_level: str = "Q8_0"
    capabilities: tuple[str, ...] = ("completion", "tools")
    context_length: int = 131072
    revision: int = 0
    loaded_size: int | None = None
    """Bytes in memory once loaded (``/api/ps`` ``size``); default: ``size``."""
    size_vram: int | None = None
    """Of those, on the GPU (``/api/ps`` ``size_vram``); default: all of them."""

    @classmethod
    def embedding(cls, name: str, **fields: Any) -> FakeModel:
        """An embedding-only model, like nomic-embed-text."""
        defaults: dict[str, Any] = {
            "size": 274_302_450,
            "family": "nomic-bert",
            "parameter_size": "137M",
            "quantization_level": "F16",
            "capabilities": ("embedding",),
            "context_length": 2048,
        }
        return cls(canonical(name), **{**defaults, **fields})

    @classmethod
    def vision(cls, name: str, **fields: Any) -> FakeModel:
        """A chat model that also reads images, like gemma3."""
        defaults: dict[str, Any] = {
            "size": 3_338_801_804,
            "family": "gemma3",
            "parameter_size": "4.3B",
            "quantization_level": "Q4_K_M",
            "capabilities": ("completion", "vision"),
        }
        return cls(canonical(name), **{**defaults, **fields})

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.name}@{self.revision}".encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def layers(self) -> list[tuple[str, int]]:
        """``(digest, bytes)`` of each layer a pull downloads, the weights first."""
        small = sum(size for _, size in SMALL_LAYERS)
        parts = [("weights", max(1, self.size - small)), *SMALL_LAYERS]
        return [
            (hashlib.sha256(f"{self.digest}/{part}".encode()).hexdigest(), size)
            for part, size in parts
        ]


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: Any


def canonical(name: str) -> str:
    """Ollama's reading of a model name: no tag means ``:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _go_time(moment: datetime) -> str:
    """RFC 3339 with nanoseconds and the server's offset, as Go's time.Time marshals."""
    text = moment.astimezone(SERVER_TZ).isoformat(timespec="microseconds")
    # Go prints nanoseconds; Python keeps microseconds, so three more digits stand in for them.
    return f"{text[:26]}417{text[26:]}"


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_of(body: dict[str, Any]) -> timedelta | None:
    """The request's ``keep_alive`` as Ollama's api.Duration reads it; None when absent.

    A JSON number is seconds, negative meaning forever; a string must be a Go duration, so the
    string "-1" is refused for its missing unit, as by Ollama.
    """
    if "keep_alive" not in body or body["keep_alive"] is None:
        return None
    value = body["keep_alive"]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _BadRequest(f"unsupported duration type: '{type(value).__name__}'")
    if isinstance(value, int | float):
        return FOREVER if value < 0 else timedelta(seconds=value)
    sign, text = (-1, value[1:]) if value.startswith("-") else (1, value.removeprefix("+"))
    if text == "0":
        return timedelta(0)
    seconds, position = 0.0, 0
    for match in _GO_DURATION.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _GO_UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        has_unit = bool(re.search(r"[a-zµ]", text))
        problem = "invalid duration" if has_unit else "missing unit in duration"
        raise _BadRequest(f'time: {problem} "{value}"')
    return FOREVER if sign < 0 else timedelta(seconds=seconds)


def _pieces(text: str) -> list[str]:
    """Split the reply into word-sized "tokens" that join back into the exact text."""
    return re.findall(r"\s*\S+", text) or [text]


@dataclass
class FakeOllamaState:
    """Everything the fake knows and counts; tests may read and change it while it runs.

    The app runs on uvicorn's thread and tests read this from theirs: every update is a single
    attribute store or list append, which the GIL keeps whole, so no lock is needed.
    """

    models: dict[str, FakeModel] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    keep_until: dict[str, datetime] = field(default_factory=dict)
    """When each loaded model unloads; a loaded model missing here expires in 5 minutes."""
    registry: dict[str, FakeModel] = field(default_factory=dict)
    """What ``/api/pull`` fetches; a name not here is pulled as a default ``FakeModel``."""
    pull_failures: dict[str, str] = field(default_factory=dict)
    """Canonical name -> the error a pull of it reports after the manifest line."""
    pull_delay: float = 0.0
    tags_delay: float = 0.0
    """How long ``/api/tags`` takes to answer (a server busy with other work)."""
    pull_steps: int = 4
    """Progress lines for each layer larger than a megabyte."""
    reply: str = DEFAULT_REPLY
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fail_status: int | None = None
    fail_message: str = "an internal error occurred"
    fail_headers: dict[str, str] = field(default_factory=dict)
    """Sent with the "fail with status N" answer (a proxy's Retry-After, say)."""
    drop_after: int | None = None
    bad_json_after: int | None = None
    """Send a line that is not JSON in place of the generation line at this index."""
    error_after: int | None = None
    error_message: str = "llama runner process has terminated: exit status 2"
    version: str = "0.6.5"
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Answer a chat that offers tools (and does not end with a tool's result) with these
    calls, Ollama's shape: ``{"function": {"name": ..., "arguments": {...}}}``."""
    thinking: str = ""
    """A thinking model's reasoning, streamed in ``message.thinking`` when ``think`` is on."""
    requests: list[RecordedRequest] = field(default_factory=list)
    streams_started: int = 0
    streams_completed: int = 0
    aborted_streams: int = 0
    dropped_streams: int = 0

    def find(self, name: str) -> FakeModel | None:
        return self.models.get(canonical(name))

    def keep_loaded(self, name: str, keep_alive: timedelta | None) -> None:
        """Load ``name`` (or unload it, for a zero keep_alive) as a request's keep_alive says."""
        if keep_alive == timedelta(0):
            self.loaded.discard(name)
            self.keep_until.pop(name, None)
            return
        self.loaded.add(name)
        self.keep_until[name] = datetime.now(UTC) + (keep_alive or DEFAULT_KEEP_ALIVE)

    def expire(self) -> None:
        """Unload what has outlived its keep_alive."""
        now = datetime.now(UTC)
        for name, until in list(self.keep_until.items()):
            if until <= now:
                self.loaded.discard(name)
                del self.keep_until[name]

    @property
    def chat_bodies(self) -> list[Any]:
        return [r.body for r in self.requests if r.path == "/api/chat"]

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def last_body(self, path: str) -> Any:
        bodies = [r.body for r in self.requests if r.path == path]
        if not bodies:
            raise LookupError(f"no request to {path}")
        return bodies[-1]

    def answer(self, options: dict[str, Any]) -> tuple[list[str], str]:
        """The reply cut by ``stop`` and ``num_predict`` as Ollama would, and the done_reason."""
        text, reason = self.reply, "stop"
        stops = options.get("stop") or []
        cuts = [text.find(s) for s in stops if isinstance(s, str) and s and s in text]
        if cuts:
            text = text[: min(cuts)]
        pieces = _pieces(text) if text else []
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 < limit < len(pieces):
            pieces, reason = pieces[:limit], "length"
        return pieces, reason


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(state: FakeOllamaState) -> Starlette:
    """The Starlette app serving ``state``."""

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            raise _BadRequest("missing request body")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _BadRequest(f"invalid character in request body: {exc}") from None
        if not isinstance(body, dict):
            raise _BadRequest("json: cannot unmarshal into Go value of type api.Request")
        state.requests.append(RecordedRequest(request.method, request.url.path, body))
        return body

    def require_model(body: dict[str, Any], *, generate: bool = False) -> FakeModel:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            # Ollama's quirk, kept: /api/generate calls a missing name a model not found.
            if generate:
                raise _BadRequest("model '' not found", 404)
            raise _BadRequest("model is required")
        model = state.find(name)
        if model is None:
            raise _BadRequest(f"model '{name}' not found", 404)
        return model

    def options_of(body: dict[str, Any]) -> dict[str, Any]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _BadRequest("json: cannot unmarshal options into map[string]interface {}")
        return options

    def handler(
        fn: Callable[[Request], Any],
    ) -> Callable[[Request], Any]:
        """Apply the "fail with status N" switch and turn ``_BadRequest`` into Ollama's body."""

        async def wrapped(request: Request) -> Response:
            if state.fail_status is not None:
                await request.body()
                failed = _error(state.fail_status, state.fail_message)
                failed.headers.update(state.fail_headers)
                return failed
            try:
                response: Response = await fn(request)
            except _BadRequest as exc:
                return _error(exc.status, exc.message)
            return response

        return wrapped

    async def stream(
        lines: Iterable[dict[str, Any]], *, generation: bool, delay: float = 0.0
    ) -> AsyncIterator[bytes]:
        state.streams_started += 1
        finished = dropped = False
        try:
            for index, line in enumerate(lines):
                if delay and index:
                    await asyncio.sleep(delay)
                if generation:
                    if state.drop_after is not None and index >= state.drop_after:
                        dropped = True
                        state.dropped_streams += 1
                        raise DropConnection
                    if state.error_after is not None and index >= state.error_after:
                        yield _ndjson({"error": state.error_message})
                        break
                    if state.bad_json_after is not None and index >= state.bad_json_after:
                        yield b'{"model": "truncated\n'
                        break
                    await asyncio.sleep(
                        state.first_token_delay if index == 0 else state.token_delay
                    )
                yield _ndjson(line)
            finished = True
            state.streams_completed += 1
        finally:
            # Reached with finished False only when the client went away: Starlette cancels
            # the response task on disconnect, which raises CancelledError at our sleep (or
            # GeneratorExit at the yield).
            if not finished and not dropped:
                state.aborted_streams += 1

    def generation_lines(
        model_name: str,
        pieces: list[str],
        reason: str,
        prompt_tokens: int,
        *,
        chat: bool,
    ) -> list[dict[str, Any]]:
        def content(text: str) -> dict[str, Any]:
            if chat:
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        lines = [
            {"model": model_name, "created_at": _now(), **content(piece), "done": False}
            for piece in pieces
        ]
        final: dict[str, Any] = {
            "model": model_name,
            "created_at": _now(),
            **content(""),
            "done_reason": reason,
            "done": True,
            "total_duration": 4_883_583_458,
            "load_duration": 1_334_875,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 342_546_000,
            "eval_count": len(pieces),
            "eval_duration": 4_535_599_000,
        }
        if not chat:
            final["context"] = list(range(1, prompt_tokens + len(pieces) + 1))
        lines.append(final)
        return lines

    def respond(body: dict[str, Any], lines: list[dict[str, Any]], *, chat: bool) -> Response:
        if body.get("stream", True):
            return StreamingResponse(stream(lines, generation=True), media_type=NDJSON)
        # Not streamed: one object with the whole answer and the final counters.
        whole = dict(lines[-1])
        text = "".join(
            (line["message"]["content"] if chat else line["response"]) for line in lines[:-1]
        )
        if chat:
            whole["message"] = {"role": "assistant", "content": text}
        else:
            whole["response"] = text
        return JSONResponse(whole)

    def load_or_unload(body: dict[str, Any], model: FakeModel, *, chat: bool) -> JSONResponse:
        keep_alive = keep_alive_of(body)
        unload = keep_alive == timedelta(0)
        if not unload:
            require_capability(body, model, "chat" if chat else "generate")
        state.keep_loaded(model.name, keep_alive)
        payload: dict[str, Any] = {
            "model": body["model"],
            "created_at": _now(),
            "done_reason": "unload" if unload else "load",
            "done": True,
        }
        if chat:
            payload["message"] = {"role": "assistant", "content": ""}
        else:
            payload["response"] = ""
        return JSONResponse(payload)

    def check_tools_and_images(
        body: dict[str, Any], model: FakeModel, messages: list[dict[str, Any]]
    ) -> None:
        """Ollama's refusals: tools to a model without them, images to one that cannot see,
        image data that is not base64 (Go decodes it into bytes)."""
        if body.get("tools") and "tools" not in model.capabilities:
            raise _BadRequest(f"registry.ollama.ai/library/{model.name} does not support tools")
        images = [image for m in messages for image in m.get("images") or []]
        if images and "vision" not in model.capabilities:
            raise _BadRequest(f"{model.name} does not support images")  # an approximation
        for image in images:
            try:
                base64.b64decode(image, validate=True)
            except (ValueError, TypeError):
                raise _BadRequest("illegal base64 data at input byte 0") from None

    def require_capability(body: dict[str, Any], model: FakeModel, endpoint: str) -> None:
        """Ollama's refusal to chat with (or generate from) an embedding-only model."""
        if "completion" not in model.capabilities:
            raise _BadRequest(f'"{body["model"]}" does not support {endpoint}')

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return JSONResponse({"version": state.version})

    async def tags(request: Request) -> Response:
        if state.tags_delay:
            await asyncio.sleep(state.tags_delay)
        models = [
            {
                "name": m.name,
                "model": m.name,
                "modified_at": "2025-01-04T14:56:49.277302595-07:00",
                "size": m.size,
                "digest": m.digest,
                "details": m.details(),
            }
            for m in state.models.values()
        ]
        return JSONResponse({"models": models})

    async def ps(request: Request) -> Response:
        state.expire()
        default_expiry = datetime.now(UTC) + DEFAULT_KEEP_ALIVE
        models = []
        for m in state.models.values():
            if m.name not in state.loaded:
                continue
            in_memory = m.loaded_size if m.loaded_size is not None else m.size
            models.append(
                {
                    "name": m.name,
                    "model": m.name,
                    "size": in_memory,
                    "digest": m.digest,
                    "details": m.details(),
                    "expires_at": _go_time(state.keep_until.get(m.name, default_expiry)),
                    "size_vram": m.size_vram if m.size_vram is not None else in_memory,
                    "context_length": 4096,
                }
            )
        return JSONResponse({"models": models})

    async def show(request: Request) -> Response:
        model = require_model(await read_body(request))
        model_info: dict[str, Any] = {
            "general.architecture": model.family,
            "general.file_type": 7,
            "general.parameter_count": 1_235_814_432,
            "general.quantization_version": 2,
            f"{model.family}.block_count": 16,
            f"{model.family}.context_length": model.context_length,
            f"{model.family}.embedding_length": 2048,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": [],
        }
        shown: dict[str, Any] = {
            "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {model.name}\n',
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": model.details(),
            "model_info": model_info,
            "capabilities": list(model.capabilities),
            "modified_at": "2025-01-04T14:56:49.277302595-07:00",
        }
        if "vision" in model.capabilities:
            # The image encoder's metadata: its own context_length must not be mistaken for
            # the model's.
            shown["projector_info"] = {
                "general.architecture": "clip",
                "clip.vision.image_size": 896,
            }
            model_info["clip.vision.context_length"] = 256
        return JSONResponse(shown)

    async def chat(request: Request) -> Response:
        body = await read_body(request)
        model = require_model(body)
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise _BadRequest("invalid message: each needs a known role and string content")
        if not messages:
            return load_or_unload(body, model, chat=True)
        require_capability(body, model, "chat")
        think = body.get("think")
        if think not in (None, False, True, "low", "medium", "high"):
            raise _BadRequest(f"invalid think value: {think!r}")
        if think and "thinking" not in model.capabilities:
            raise _BadRequest(f'"{body["model"]}" does not support thinking')
        check_tools_and_images(body, model, messages)
        state.keep_loaded(model.name, keep_alive_of(body))  # Ollama loads a model on first use
        pieces, reason = state.answer(options_of(body))
        prompt_tokens = max(1, sum(len(m["content"].split()) for m in messages))
        calls_now = bool(body.get("tools")) and messages[-1]["role"] != "tool"
        if calls_now and state.tool_calls:
            pieces = []
        lines = generation_lines(body["model"], pieces, reason, prompt_tokens, chat=True)
        if calls_now and state.tool_calls:
            # Ollama sends the calls in a line of their own before the final one.
            message = {"role": "assistant", "content": "", "tool_calls": state.tool_calls}
            call_line = {"model": body["model"], "created_at": _now(), "message": message}
            lines.insert(0, {**call_line, "done": False})
        if body.get("think") and state.thinking and "thinking" in model.capabilities:
            thoughts = [
                {
                    "model": body["model"],
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": "", "thinking": piece},
                    "done": False,
                }
                for piece in _pieces(state.thinking)
            ]
            lines[:0] = thoughts
        return respond(body, lines, chat=True)

    async def generate(request: Request) -> Response:
        body = await read_body(request)
        model = require_model(body, generate=True)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _BadRequest("json: cannot unmarshal prompt into Go value of type string")
        if not prompt:
            return load_or_unload(body, model, chat=False)
        require_capability(body, model, "generate")
        state.keep_loaded(model.name, keep_alive_of(body))
        pieces, reason = state.answer(options_of(body))
        prompt_tokens = max(1, len(prompt.split()))
        lines = generation_lines(body["model"], pieces, reason, prompt_tokens, chat=False)
        return respond(body, lines, chat=False)

    async def embed(request: Request) -> Response:
        body = await read_body(request)
        model = require_model(body)
        given = body.get("input")
        # No input, or an empty one, just loads the model (as Ollama's EmbedHandler does).
        inputs = [] if given in (None, "") else [given] if isinstance(given, str) else given
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise _BadRequest("invalid input type")
        state.keep_loaded(model.name, keep_alive_of(body))
        return JSONResponse(
            {
                "model": body["model"],
                "embeddings": [_embedding(text) for text in inputs],
                "total_duration": 14_143_917,
                "load_duration": 1_019_500,
                "prompt_eval_count": sum(len(text.split()) for text in inputs),
            }
        )

    def pull_lines(model: FakeModel) -> Iterator[dict[str, Any]]:
        """Ollama's pull progress; a generator, so the model is installed only if the client
        reads past the manifest being written (a pull abandoned earlier installs nothing)."""
        yield {"status": "pulling manifest"}
        failure = state.pull_failures.get(model.name)
        if failure is not None:
            yield {"error": failure}
            return
        for digest, size in model.layers():
            status = f"pulling {digest[:12]}"
            yield {"status": status, "digest": f"sha256:{digest}", "total": size}
            steps = state.pull_steps if size > 1_000_000 else 1
            for step in range(1, steps + 1):
                yield {
                    "status": status,
                    "digest": f"sha256:{digest}",
                    "total": size,
                    "completed": size * step // steps,
                }
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        state.models[model.name] = model
        yield {"status": "success"}

    async def pull(request: Request) -> Response:
        body = await read_body(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise _BadRequest("model is required")
        model = state.registry.get(canonical(name)) or state.find(name)
        model = model or FakeModel(canonical(name))
        if body.get("stream", True):
            lines = pull_lines(model)
            return StreamingResponse(
                stream(lines, generation=False, delay=state.pull_delay), media_type=NDJSON
            )
        for line in pull_lines(model):
            if "error" in line:
                return _error(500, line["error"])
        return JSONResponse({"status": "success"})

    async def delete(request: Request) -> Response:
        body = await read_body(request)
        model = require_model(body)
        del state.models[model.name]
        state.loaded.discard(model.name)
        state.keep_until.pop(model.name, None)
        return Response(status_code=200)

    async def page_not_found(request: Request, exc: Exception) -> Response:
        # gin's answer for an unknown path (and, by default, for a wrong method).
        return PlainTextResponse("404 page not found", status_code=404)

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", handler(version), methods=["GET"]),
        Route("/api/tags", handler(tags), methods=["GET"]),
        Route("/api/ps", handler(ps), methods=["GET"]),
        Route("/api/show", handler(show), methods=["POST"]),
        Route("/api/chat", handler(chat), methods=["POST"]),
        Route("/api/generate", handler(generate), methods=["POST"]),
        Route("/api/embed", handler(embed), methods=["POST"]),
        Route("/api/pull", handler(pull), methods=["POST"]),
        Route("/api/delete", handler(delete), methods=["DELETE"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: page_not_found, 405: page_not_found},
    )


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"  # Go's compact encoding


def _embedding(text: str, dims: int = 8) -> list[float]:
    """A deterministic unit vector per text, like a real embedding without the model."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:dims]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]


@dataclass
class FakeOllama:
    """A running fake: where it listens and what it has seen."""

    url: str
    state: FakeOllamaState

    def wait_until(
        self, predicate: Callable[[FakeOllamaState], bool], timeout: float = 5.0
    ) -> bool:
        """Poll ``predicate(state)`` until it holds or ``timeout`` passes (the server runs in
        another thread, so what it records lags a client's view by a moment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.state):
                return True
            time.sleep(0.01)
        return predicate(self.state)


@contextmanager
def running_fake_ollama(
    models: Sequence[str | FakeModel] = ("llama3.2:1b", "qwen2.5:0.5b"),
    *,
    loaded: Sequence[str] = (),
    reply: str = DEFAULT_REPLY,
    first_token_delay: float = 0.0,
    token_delay: float = 0.0,
    fail_status: int | None = None,
    drop_after: int | None = None,
    error_after: int | None = None,
    registry: Sequence[FakeModel] = (),
    pull_delay: float = 0.0,
) -> Iterator[FakeOllama]:
    """Start a fake Ollama on a free loopback port for the ``with`` block."""
    installed = [FakeModel(canonical(m)) if isinstance(m, str) else m for m in models]
    state = FakeOllamaState(
        models={m.name: m for m in installed},
        registry={canonical(m.name): m for m in registry},
        pull_delay=pull_delay,
        loaded={canonical(name) for name in loaded},
        reply=reply,
        first_token_delay=first_token_delay,
        token_delay=token_delay,
        fail_status=fail_status,
        drop_after=drop_after,
        error_after=error_after,
    )
    with serve_in_thread(build_app(state)) as url:
        yield FakeOllama(url=url, state=state)


__all__ = [
    "NOT_IN_REGISTRY",
    "FakeModel",
    "FakeOllama",
    "FakeOllamaState",
    "RecordedRequest",
    "build_app",
    "running_fake_ollama",
]
