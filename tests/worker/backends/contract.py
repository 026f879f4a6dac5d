"""The adapters under the contract, each with the fake of its server: one ``Setup`` per pair.

A setup says how to start the fake, how to build the adapter against it, which model to ask
for, how to read the options back from the request in the backend's own names, and how to make
the fake answer a rate limit. Every fake has the same switches (``fail_status``,
``fail_headers``, ``drop_after``, ``error_after``, ``bad_json_after``, delays, ``reply``) and
counters (``chat_bodies``, ``aborted_streams``, ``model_listings``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr

from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.fakes.fake_gemini import quota_details, running_fake_gemini
from tests.fakes.fake_ollama import running_fake_ollama
from tests.fakes.fake_openai import running_fake_openai
from worker.backends.anthropic import AnthropicBackend
from worker.backends.base import Backend
from worker.backends.google import GoogleBackend
from worker.backends.ollama import OllamaBackend
from worker.backends.openai_compat import OpenAICompatBackend

T = TypeVar("T")

PLANTED_KEY = "sk-planted-contract-key-7f3a9c"
"""The key every keyed fake accepts; a test that sees it in an error message fails."""
WRONG_KEY = "sk-wrong-contract-key-0b1d2e"


@dataclass(frozen=True)
class Setup:
    id: str
    start: Callable[[], AbstractContextManager[Any]]
    make: Callable[[str, httpx.AsyncClient, str], Backend]
    """``make(url, client, key)``: the adapter against the fake at ``url``."""
    model: str
    models: tuple[str, ...]
    """What ``inventory`` lists."""
    options_seen: Callable[[dict[str, Any]], dict[str, Any]]
    """temperature, max_tokens, stop and seed from a recorded request body."""
    rate_limit: Callable[[Any, int], None]
    """Make the fake answer 429 with a wait of this many seconds, the provider's way."""
    keyed: bool = True
    key_source: str | None = None
    cloud: bool = False


def _ollama_options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options", {})
    return {
        "temperature": options.get("temperature"),
        "max_tokens": options.get("num_predict"),
        "stop": options.get("stop"),
        "seed": options.get("seed"),
    }


def _openai_options(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body.get(k) for k in ("temperature", "max_tokens", "stop", "seed")}


def _openai_cloud_options(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "temperature": body.get("temperature"),
        "max_tokens": body.get("max_completion_tokens"),
        "stop": body.get("stop"),
        "seed": body.get("seed"),
    }


def _mistral_options(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "temperature": body.get("temperature"),
        "max_tokens": body.get("max_tokens"),
        "stop": body.get("stop"),
        "seed": body.get("random_seed"),
    }


def _anthropic_options(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "temperature": body.get("temperature"),
        "max_tokens": body.get("max_tokens"),
        "stop": body.get("stop_sequences"),
        "seed": body.get("seed"),  # Anthropic has none: never sent
    }


def _gemini_options(body: dict[str, Any]) -> dict[str, Any]:
    config = body.get("generationConfig", {})
    return {
        "temperature": config.get("temperature"),
        "max_tokens": config.get("maxOutputTokens"),
        "stop": config.get("stopSequences"),
        "seed": config.get("seed"),
    }


def _retry_after_header(state: Any, seconds: int) -> None:
    state.fail_status = 429
    state.fail_message = "Rate limit reached for requests"
    state.fail_headers = {"retry-after": str(seconds)}


def _gemini_rate_limit(state: Any, seconds: int) -> None:
    state.fail_status = 429
    state.fail_message = "Resource has been exhausted (e.g. check quota)."
    state.fail_details = quota_details("Minute", seconds)


SETUPS = [
    Setup(
        id="ollama",
        start=lambda: running_fake_ollama(("llama3.2:1b",)),
        make=lambda url, client, key: OllamaBackend("ollama", url, client),
        model="llama3.2:1b",
        models=("llama3.2:1b",),
        options_seen=_ollama_options,
        rate_limit=_retry_after_header,
        keyed=False,
    ),
    Setup(
        id="openai-compatible",
        start=lambda: running_fake_openai(api_key=PLANTED_KEY, models=["tiny-model"]),
        make=lambda url, client, key: OpenAICompatBackend(
            "gpu", url, client, capacity=2, api_key=SecretStr(key)
        ),
        model="tiny-model",
        models=("tiny-model",),
        options_seen=_openai_options,
        rate_limit=_retry_after_header,
    ),
    Setup(
        id="openai-cloud",
        start=lambda: running_fake_openai(api_key=PLANTED_KEY, models=["gpt-test"]),
        make=lambda url, client, key: OpenAICompatBackend(
            "openai",
            f"{url}/v1",
            client,
            capacity=4,
            api_key=SecretStr(key),
            kind="openai-cloud",
            key_source="OPENAI_API_KEY",
        ),
        model="gpt-test",
        models=("gpt-test",),
        options_seen=_openai_cloud_options,
        rate_limit=_retry_after_header,
        key_source="OPENAI_API_KEY",
        cloud=True,
    ),
    Setup(
        id="mistral",
        start=lambda: running_fake_openai(
            api_key=PLANTED_KEY, models=["mistral-test"], dialect="mistral"
        ),
        make=lambda url, client, key: OpenAICompatBackend(
            "mistral",
            f"{url}/v1",
            client,
            capacity=4,
            api_key=SecretStr(key),
            kind="mistral",
            key_source="MISTRAL_API_KEY",
        ),
        model="mistral-test",
        models=("mistral-test",),
        options_seen=_mistral_options,
        rate_limit=_retry_after_header,
        key_source="MISTRAL_API_KEY",
        cloud=True,
    ),
    Setup(
        id="anthropic",
        start=lambda: running_fake_anthropic(api_key=PLANTED_KEY),
        make=lambda url, client, key: AnthropicBackend(
            "claude", url, client, SecretStr(key), key_source="ANTHROPIC_API_KEY"
        ),
        model="claude-test-1",
        models=("claude-test-1", "claude-test-2"),
        options_seen=_anthropic_options,
        rate_limit=_retry_after_header,
        key_source="ANTHROPIC_API_KEY",
        cloud=True,
    ),
    Setup(
        id="google",
        start=lambda: running_fake_gemini(api_key=PLANTED_KEY),
        make=lambda url, client, key: GoogleBackend(
            "gemini", url, client, SecretStr(key), key_source="GEMINI_API_KEY"
        ),
        model="gemini-test-flash",
        models=("gemini-test-flash", "gemini-test-pro"),
        options_seen=_gemini_options,
        rate_limit=_gemini_rate_limit,
        key_source="GEMINI_API_KEY",
        cloud=True,
    ),
]


def with_backend(
    setup: Setup,
    url: str,
    scenario: Callable[[Backend], Awaitable[T]],
    key: str = PLANTED_KEY,
    read_timeout_s: float = 10.0,
) -> T:
    """Run ``scenario`` against a fresh adapter (and HTTP client) on its own event loop."""

    async def main() -> T:
        timeout = httpx.Timeout(read_timeout_s, connect=2.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await scenario(setup.make(url, client, key))

    return asyncio.run(main())
