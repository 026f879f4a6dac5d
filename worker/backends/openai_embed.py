"""``POST /v1/embeddings`` on an OpenAI-compatible server (llama.cpp started with embeddings
on, vLLM, OpenAI and Mistral in the cloud): the request, its answer, the vectors in order.

Kept apart from ``openai_compat`` (the chat stream and the model list) so each reads as one
endpoint; the adapter passes its client, headers and error mapper in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.backends.base import Embeddings
from worker.backends.http_errors import HttpErrors


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Embedding(_Wire):
    index: int = 0
    embedding: list[float]


class _Usage(_Wire):
    prompt_tokens: int | None = None


class _EmbeddingList(_Wire):
    data: list[_Embedding] = Field(default_factory=list)
    usage: _Usage | None = None


async def post_embeddings(
    client: httpx.AsyncClient,
    api_root: str,
    headers: Mapping[str, str],
    errors: HttpErrors,
    model: str,
    inputs: Sequence[str],
) -> Embeddings:
    """One request for the whole batch. No ``encoding_format``: floats are every server's
    default, and a strict API (Mistral's refuses fields it does not know) may not take it."""
    body = {"model": model, "input": list(inputs)}
    with errors.translating():
        response = await client.post(f"{api_root}/embeddings", json=body, headers=dict(headers))
        await errors.check(response, model)
    try:
        listing = _EmbeddingList.model_validate_json(response.content)
    except ValidationError:
        raise errors.bad_payload(
            "an /embeddings body that is not a list of vectors", response.text
        ) from None
    # The answer says which input each vector is for; servers keep the order, but need not.
    ordered = sorted(listing.data, key=lambda item: item.index)
    usage = listing.usage.prompt_tokens if listing.usage is not None else None
    return Embeddings([item.embedding for item in ordered], usage)
