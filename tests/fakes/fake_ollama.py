"""A fake Ollama server, written from Ollama's API documentation (docs/api.md).

Ollama cannot be installed on these machines, so the adapter is tested against this Starlette
app instead. It keeps to the documented wire format: NDJSON streams (``application/x-ndjson``)
whose last line has ``done: true``, ``done_reason`` and the token counters; model names where a
missing tag means ``:latest``; ``{"error": "..."}`` bodies with Ollama's status codes (404
``model 'x' not found``, 400 for a bad request, gin's plain ``404 page not found`` for an unknown
path); an ``{"error": ...}`` line when a stream fails after its 200 header; models that load on
first use and then show in ``/api/ps``.

Switches for the tests: installed and loaded models, time to first token and between tokens, the
canned reply, "fail every request with status N", "drop the connection after K lines" and
"report an error after K lines". Streams that the client abandons before the end are counted
in ``aborted_streams``: that is how a test proves a cancel closed the stream on the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import DropConnection, serve_in_thread

DEFAULT_REPLY = "The sky is blue because air scatters blue light more than red light."
ROLES = frozenset({"system", "user", "assistant", "tool"})
NDJSON = "application/x-ndjson"


@dataclass
class FakeModel:
    """One installed model, as ``/api/tags`` describes it."""

    name: str
    size: int = 1_321_098_329
    family: str = "llama"
    parameter_size: str = "1.2B"
    quantization_level: str = "Q8_0"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


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
    reply: str = DEFAULT_REPLY
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fail_status: int | None = None
    fail_message: str = "an internal error occurred"
    drop_after: int | None = None
    error_after: int | None = None
    error_message: str = "llama runner process has terminated: exit status 2"
    version: str = "0.6.5"
    requests: list[RecordedRequest] = field(default_factory=list)
    streams_started: int = 0
    streams_completed: int = 0
    aborted_streams: int = 0
    dropped_streams: int = 0

    def find(self, name: str) -> FakeModel | None:
        return self.models.get(canonical(name))

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


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


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
                return _error(state.fail_status, state.fail_message)
            try:
                response: Response = await fn(request)
            except _BadRequest as exc:
                return _error(exc.status, exc.message)
            return response

        return wrapped

    async def stream(lines: Sequence[dict[str, Any]], *, generation: bool) -> AsyncIterator[bytes]:
        state.streams_started += 1
        finished = dropped = False
        try:
            for index, line in enumerate(lines):
                if generation:
                    if state.drop_after is not None and index >= state.drop_after:
                        dropped = True
                        state.dropped_streams += 1
                        raise DropConnection
                    if state.error_after is not None and index >= state.error_after:
                        yield _ndjson({"error": state.error_message})
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
        unload = body.get("keep_alive") in (0, "0", "0s")
        if unload:
            state.loaded.discard(model.name)
        else:
            state.loaded.add(model.name)
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

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return JSONResponse({"version": state.version})

    async def tags(request: Request) -> Response:
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
        expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        models = [
            {
                "name": m.name,
                "model": m.name,
                "size": m.size,
                "digest": m.digest,
                "details": m.details(),
                "expires_at": expires,
                "size_vram": m.size,
                "context_length": 4096,
            }
            for m in state.models.values()
            if m.name in state.loaded
        ]
        return JSONResponse({"models": models})

    async def show(request: Request) -> Response:
        model = require_model(await read_body(request))
        return JSONResponse(
            {
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {model.name}\n',
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": model.details(),
                "model_info": {
                    "general.architecture": model.family,
                    "general.parameter_count": 1_235_814_432,
                    f"{model.family}.context_length": 131072,
                },
                "capabilities": ["completion"],
                "modified_at": "2025-01-04T14:56:49.277302595-07:00",
            }
        )

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
        state.loaded.add(model.name)  # Ollama loads a model on first use
        pieces, reason = state.answer(options_of(body))
        prompt_tokens = max(1, sum(len(m["content"].split()) for m in messages))
        lines = generation_lines(body["model"], pieces, reason, prompt_tokens, chat=True)
        return respond(body, lines, chat=True)

    async def generate(request: Request) -> Response:
        body = await read_body(request)
        model = require_model(body, generate=True)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _BadRequest("json: cannot unmarshal prompt into Go value of type string")
        if not prompt:
            return load_or_unload(body, model, chat=False)
        state.loaded.add(model.name)
        pieces, reason = state.answer(options_of(body))
        prompt_tokens = max(1, len(prompt.split()))
        lines = generation_lines(body["model"], pieces, reason, prompt_tokens, chat=False)
        return respond(body, lines, chat=False)

    async def embed(request: Request) -> Response:
        body = await read_body(request)
        model = require_model(body)
        given = body.get("input")
        inputs = [given] if isinstance(given, str) else given
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise _BadRequest("invalid input type")
        state.loaded.add(model.name)
        return JSONResponse(
            {
                "model": body["model"],
                "embeddings": [_embedding(text) for text in inputs],
                "total_duration": 14_143_917,
                "load_duration": 1_019_500,
                "prompt_eval_count": sum(len(text.split()) for text in inputs),
            }
        )

    async def pull(request: Request) -> Response:
        body = await read_body(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise _BadRequest("model is required")
        model = state.find(name) or FakeModel(canonical(name))
        digest = f"sha256:{model.digest}"
        lines: list[dict[str, Any]] = [
            {"status": "pulling manifest"},
            {"status": f"pulling {model.digest[:12]}", "digest": digest, "total": model.size},
            {
                "status": f"pulling {model.digest[:12]}",
                "digest": digest,
                "total": model.size,
                "completed": model.size,
            },
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        state.models[model.name] = model
        if body.get("stream", True):
            return StreamingResponse(stream(lines, generation=False), media_type=NDJSON)
        return JSONResponse({"status": "success"})

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
) -> Iterator[FakeOllama]:
    """Start a fake Ollama on a free loopback port for the ``with`` block."""
    installed = [FakeModel(canonical(m)) if isinstance(m, str) else m for m in models]
    state = FakeOllamaState(
        models={m.name: m for m in installed},
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
    "FakeModel",
    "FakeOllama",
    "FakeOllamaState",
    "RecordedRequest",
    "build_app",
    "running_fake_ollama",
]
