"""The backend contract: what every adapter does, checked against the fake of its server.

Each test runs once per (adapter, fake) pair in ``contract.SETUPS``: Ollama, an
OpenAI-compatible server, OpenAI's and Mistral's cloud APIs, Anthropic's Messages API and
Google's Gemini API. What is the same for all lives here; what only one provider does
(Anthropic's 529, a Gemini safety stop) lives in that adapter's own test file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from broker.errors import (
    BackendAuthError,
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    ModelNotFound,
)
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo
from controller.localcluster import free_port
from tests.worker.backends.contract import PLANTED_KEY, SETUPS, WRONG_KEY, Setup, with_backend
from worker.backends.base import Backend, Chunk

REPLY = "one two three four"
PROMPT = (
    ChatMessage(role="system", content="answer briefly"),
    ChatMessage(role="user", content="count to four"),
)

pytestmark = pytest.mark.parametrize("setup", SETUPS, ids=[s.id for s in SETUPS])


NO_OPTIONS = GenerationOptions()


def chat(
    model: str, options: GenerationOptions = NO_OPTIONS
) -> Callable[[Backend], Awaitable[list[Chunk]]]:
    async def scenario(backend: Backend) -> list[Chunk]:
        return [c async for c in backend.stream_chat(model, PROMPT, options)]

    return scenario


def failure(setup: Setup, url: str, key: str = PLANTED_KEY) -> BackendError:
    with pytest.raises(BackendError) as caught:
        with_backend(setup, url, chat(setup.model), key=key)
    error = caught.value
    assert PLANTED_KEY not in str(error) and WRONG_KEY not in str(error)
    return error


# --- the answer ----------------------------------------------------------------------------


def test_tokens_stream_in_order_then_one_done_chunk_with_usage(setup: Setup) -> None:
    with setup.start() as fake:
        fake.state.reply = REPLY
        chunks = with_backend(setup, fake.url, chat(setup.model))
    *deltas, last = chunks
    assert [c.text for c in deltas] == ["one", " two", " three", " four"]
    assert not any(c.done for c in deltas)
    assert last.done and last.text == "" and last.finish_reason == "stop"
    assert last.completion_tokens == 4
    assert last.prompt_tokens is not None and last.prompt_tokens > 0


def test_options_reach_the_backend_in_its_own_names(setup: Setup) -> None:
    options = GenerationOptions(temperature=0.5, max_tokens=2, stop=("four",), seed=7)
    with setup.start() as fake:
        fake.state.reply = REPLY
        chunks = with_backend(setup, fake.url, chat(setup.model, options))
        (body,) = fake.state.chat_bodies
    seen = setup.options_seen(body)
    expected_seed = None if setup.id == "anthropic" else 7  # Anthropic has no seed
    assert seen == {"temperature": 0.5, "max_tokens": 2, "stop": ["four"], "seed": expected_seed}
    assert "".join(c.text for c in chunks) == "one two"
    assert chunks[-1].finish_reason == "length"


def test_a_stop_sequence_ends_the_answer_early(setup: Setup) -> None:
    with setup.start() as fake:
        fake.state.reply = REPLY
        chunks = with_backend(
            setup, fake.url, chat(setup.model, GenerationOptions(stop=("three",)))
        )
    assert "".join(c.text for c in chunks) == "one two"
    assert chunks[-1].done and chunks[-1].finish_reason == "stop"


def test_inventory_lists_the_served_models(setup: Setup) -> None:
    async def three_times(backend: Backend) -> list[list[ModelInfo]]:
        return [await backend.inventory() for _ in range(3)]

    with setup.start() as fake:
        listings = with_backend(setup, fake.url, three_times)
        if setup.cloud:
            # A provider's catalogue is cached, not asked for on every heartbeat.
            assert fake.state.model_listings == 1
    for models in listings:
        assert tuple(m.name for m in models) == setup.models


# --- failures ------------------------------------------------------------------------------


def test_an_unknown_model_is_model_not_found(setup: Setup) -> None:
    with setup.start() as fake, pytest.raises(ModelNotFound, match="no-such-model"):
        with_backend(setup, fake.url, chat("no-such-model"))


def test_a_refused_key_is_an_auth_error_naming_its_variable_never_the_key(setup: Setup) -> None:
    with setup.start() as fake:
        if setup.keyed:
            error = failure(setup, fake.url, key=WRONG_KEY)  # the fakes echo the key they got
        else:
            fake.state.fail_status, fake.state.fail_message = 401, "unauthorized"
            error = failure(setup, fake.url)
    assert isinstance(error, BackendAuthError)
    assert error.retryable  # another node holds its own key
    if setup.key_source:
        assert setup.key_source in str(error)


def test_a_rate_limit_carries_the_wait(setup: Setup) -> None:
    with setup.start() as fake:
        setup.rate_limit(fake.state, 7)
        error = failure(setup, fake.url)
    assert type(error) is BackendRateLimited
    assert error.retry_after == 7
    assert "retry after 7s" in str(error)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(404, BackendProtocolError), (500, BackendProtocolError), (503, BackendUnavailable)],
)
def test_http_errors_map_onto_the_error_tree(
    setup: Setup, status: int, expected: type[BackendError]
) -> None:
    with setup.start() as fake:
        fake.state.fail_status = status
        fake.state.fail_message = f"the server says {status}"
        error = failure(setup, fake.url)
    assert type(error) is expected
    assert f"HTTP {status}" in str(error) and f"the server says {status}" in str(error)
    assert error.retryable


def test_a_refused_connection_is_unavailable(setup: Setup) -> None:
    error = failure(setup, f"http://127.0.0.1:{free_port()}")
    assert isinstance(error, BackendUnavailable) and "cannot connect" in str(error)


def test_a_dropped_connection_is_unavailable(setup: Setup) -> None:
    with setup.start() as fake:
        fake.state.reply = REPLY
        fake.state.drop_after = 2
        error = failure(setup, fake.url)
    assert isinstance(error, BackendUnavailable) and "dropped" in str(error)


def test_an_error_mid_stream_is_a_protocol_error_with_the_servers_words(setup: Setup) -> None:
    with setup.start() as fake:
        fake.state.reply = REPLY
        fake.state.error_after = 2
        fake.state.error_message = "the runner crashed"
        error = failure(setup, fake.url)
    assert isinstance(error, BackendProtocolError)
    assert "mid-stream" in str(error) and "the runner crashed" in str(error)


def test_a_server_silent_past_the_read_timeout_is_a_timeout(setup: Setup) -> None:
    with setup.start() as fake:
        fake.state.first_token_delay = 1.0
        with pytest.raises(BackendTimeout, match="timed out"):
            with_backend(setup, fake.url, chat(setup.model), read_timeout_s=0.2)


def test_bad_json_is_a_protocol_error(setup: Setup) -> None:
    with setup.start() as fake:
        fake.state.reply = REPLY
        fake.state.bad_json_after = 2
        error = failure(setup, fake.url)
    assert isinstance(error, BackendProtocolError) and "sent" in str(error)


# --- cancellation --------------------------------------------------------------------------


def test_cancelling_the_consumer_closes_the_stream_on_the_server(setup: Setup) -> None:
    async def scenario(backend: Backend) -> list[Chunk]:
        received: list[Chunk] = []

        async def consume() -> None:
            async for chunk in backend.stream_chat(setup.model, PROMPT, GenerationOptions()):
                received.append(chunk)

        task = asyncio.create_task(consume())
        while not received:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return received

    with setup.start() as fake:
        fake.state.reply = " ".join(["word"] * 50)
        fake.state.token_delay = 0.1
        received = with_backend(setup, fake.url, scenario)
        assert fake.wait_until(lambda s: s.aborted_streams == 1)
        assert fake.state.streams_completed == 0
    assert 1 <= len(received) < 50
