"""Embeddings in both APIs' shapes: OpenAI's ``POST /v1/embeddings`` and Ollama's
``POST /api/embed`` (and the older ``/api/embeddings``).

Each request is one embed job, its inputs batched as the client sent them, routed to a node
with that model as an embedding model. A client that leaves cancels the job.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.errors import CorralError
from broker.schemas import JobResult, JobSpec
from controller.embedding import make_embed_spec
from controller.gateway.errors import HttpError, bad_request, http_error
from controller.gateway.jobs import ClientGone, Hints, hints_from, unless_disconnected
from controller.gateway.service import Gateway
from controller.limits import check_prompt_size

OPENAI_API = "openai"
OLLAMA_API = "ollama"
ENCODINGS = ("float", "base64")


def embed_spec(gateway: Gateway, inputs: list[str], hints: Hints) -> JobSpec:
    """The job; 400 for a bad hint, 413 for inputs over the cluster's prompt limit."""
    try:
        spec = make_embed_spec(
            inputs, model=hints.model, node=hints.node, tags=hints.tags, priority=hints.priority
        )
        check_prompt_size(spec, gateway.settings.max_prompt_bytes)
    except CorralError as exc:
        raise http_error(exc) from None
    return spec


async def run_embed(gateway: Gateway, request: Request, api: str, spec: JobSpec) -> JobResult:
    """Run the job to its end (the vectors come whole); cancel it if the client leaves."""

    async def cancel() -> None:
        await gateway.client.cancel(spec.job_id)

    submitted_at = time.monotonic()
    try:
        spec = await gateway.resolve_mention(spec)
    except HttpError as exc:
        gateway.metrics.refused.labels(api, str(exc.status)).inc()
        raise
    # In flight while it runs. One that fails counts as refused with its status, like a chat
    # that fails before its first token.
    gateway.metrics.job_started()
    try:
        result = await unless_disconnected(gateway.client.run_embed(spec), request.receive, cancel)
    except CorralError as exc:
        gateway.metrics.in_flight.dec()
        error = http_error(exc)
        gateway.metrics.refused.labels(api, str(error.status)).inc()
        raise error from None
    except ClientGone:
        gateway.metrics.in_flight.dec()
        gateway.metrics.refused.labels(api, "499").inc()  # nginx's "client closed request"
        raise
    except BaseException:
        gateway.metrics.in_flight.dec()
        raise
    gateway.metrics.job_ended(
        api=api,
        node=result.node,
        model=result.model,
        outcome="ok",
        submitted_at=submitted_at,
        first_token_at=None,
        prompt_tokens=result.usage.prompt_tokens,
        completion_tokens=0,
    )
    return result


def corral_headers(spec: JobSpec, result: JobResult) -> dict[str, str]:
    return {"X-Corral-Node": result.node, "X-Corral-Job": spec.job_id}


def _texts(value: object, field: str) -> list[str]:
    """A string or a list of strings; token arrays (lists of ints) are refused clearly."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        texts = list(value)
    elif isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise bad_request(
            f"'{field}' as token arrays is not supported by the corral gateway: send text",
            "unsupported_input",
        )
    else:
        raise bad_request(f"'{field}' must be a string or a list of strings", "invalid_input")
    if not texts:
        raise bad_request(f"'{field}' must hold at least one text", "invalid_input")
    return texts


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a model, an alias, model@node or @node")
    return model


# --- OpenAI --------------------------------------------------------------------------------


def base64_floats(vector: tuple[float, ...]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32s, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def openai_embeddings(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    model = _model(body)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "invalid_encoding")
    if body.get("dimensions") is not None:
        raise bad_request(
            "'dimensions' is not supported by the corral gateway: vectors come at the model's "
            "own size",
            "dimensions_not_supported",
        )
    if "input" not in body:
        raise bad_request("'input' is required: a string or a list of strings")
    spec = embed_spec(gateway, _texts(body["input"], "input"), hints_from(model, request.headers))
    result = await run_embed(gateway, request, OPENAI_API, spec)
    prompt = result.usage.prompt_tokens or 0
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": base64_floats(vector) if encoding == "base64" else list(vector),
        }
        for index, vector in enumerate(result.embeddings)
    ]
    answer = {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
    return JSONResponse(answer, headers=corral_headers(spec, result))


# --- Ollama --------------------------------------------------------------------------------


async def ollama_embed(request: Request) -> Response:
    """``/api/embed``: ``input`` a string or a list; one vector per text."""
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    model = _model(body)
    spec = embed_spec(
        gateway, _texts(body.get("input"), "input"), hints_from(model, request.headers)
    )
    result = await run_embed(gateway, request, OLLAMA_API, spec)
    answer = {
        "model": result.model,
        "embeddings": [list(v) for v in result.embeddings],
        "total_duration": int(result.timings.total_ms * 1_000_000),
        "load_duration": 0,
        "prompt_eval_count": result.usage.prompt_tokens or 0,
    }
    return JSONResponse(answer, headers=corral_headers(spec, result))


async def ollama_embeddings(request: Request) -> Response:
    """The older ``/api/embeddings``: one ``prompt``, one ``embedding``."""
    gateway: Gateway = request.app.state.gateway
    body = await gateway.read_json(request)
    model = _model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string")
    spec = embed_spec(gateway, [prompt], hints_from(model, request.headers))
    result = await run_embed(gateway, request, OLLAMA_API, spec)
    return JSONResponse(
        {"embedding": list(result.embeddings[0])}, headers=corral_headers(spec, result)
    )


__all__ = ["base64_floats", "ollama_embed", "ollama_embeddings", "openai_embeddings"]
