"""The agent CLI backend under the backend contract, against a fake CLI script.

The same promises as the HTTP adapters (tokens in order then one done chunk, a rate limit
with its wait, errors in the tree without secrets, cancel stops the generation) plus what a
subprocess adds: the prompt on stdin and never in the arguments, the process group gone after
a cancel.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import httpx
import pytest

from broker.errors import (
    BackendProtocolError,
    BackendRateLimited,
    BackendUnavailable,
    ConfigError,
    UnsupportedRequest,
)
from broker.schemas import ChatMessage, GenerationOptions, ToolDefinition
from tests.fakes.fake_cli import LINES, fake_cli_command, write_fake_cli
from tests.support.servers import wait_until
from worker.backends.agent_cli import AgentCliBackend
from worker.backends.base import Backend, Chunk
from worker.backends.cli_output import invocation_for, retry_after_in
from worker.backends.registry import build_backends
from worker.config import CliSpec, backend_spec, build_worker_config

PROMPT = (ChatMessage(role="user", content="count to three"),)
OPTIONS = GenerationOptions()
MODEL = "sonnet"


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cli(tmp_path_factory.mktemp("cli"))


def backend(script: Path, mode: str, **fields: object) -> Backend:
    spec = backend_spec(
        kind="cli",
        command=fake_cli_command(script, mode),
        model_flag="--model",
        models=(MODEL,),
        **fields,
    )
    assert isinstance(spec, CliSpec)
    return AgentCliBackend("agent", invocation_for(spec), spec.models)


async def collect(b: Backend) -> list[Chunk]:
    return [c async for c in b.stream_chat(MODEL, PROMPT, OPTIONS)]


def test_text_lines_stream_in_order_with_the_prompt_read_from_stdin(script: Path) -> None:
    *deltas, last = asyncio.run(collect(backend(script, "stream")))
    texts = [c.text for c in deltas]
    assert texts == [
        LINES[0],
        *(f"\n{w}" for w in LINES[1:]),
        "\nmodel=sonnet prompt=count to three",
    ]
    assert not any(c.done for c in deltas)
    assert last.done and last.text == "" and last.finish_reason == "stop"
    assert last.completion_tokens == len(deltas)


def test_tokens_arrive_as_the_cli_prints_them_not_at_its_exit(script: Path) -> None:
    async def first_token_then_rest() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        stream = backend(script, "stream").stream_chat(MODEL, PROMPT, OPTIONS)
        first = None
        async for _ in stream:
            first = first if first is not None else loop.time() - start
        return first or 0.0, loop.time() - start

    first, total = asyncio.run(first_token_then_rest())
    # Three lines 50 ms apart: the first comes well before the end (under load too).
    assert total - first >= 0.1


def test_json_lines_give_the_text_at_the_field_path_and_skip_the_rest(script: Path) -> None:
    b = backend(
        script,
        "jsonl",
        output="jsonl",
        text_path="event.delta.text",
        match={"type": "stream_event"},
    )
    *deltas, last = asyncio.run(collect(b))
    assert "".join(c.text for c in deltas) == "one two three "
    assert last.done


def test_json_mode_with_a_path_that_never_matches_is_a_protocol_error(script: Path) -> None:
    b = backend(script, "stream", output="jsonl", text_path="message.text")
    with pytest.raises(BackendProtocolError, match=r"message\.text"):
        asyncio.run(collect(b))


@pytest.mark.parametrize("mode", ["ratelimit", "ratelimit-stderr"])
def test_a_usage_limit_message_is_a_rate_limit_with_the_reset_time(script: Path, mode: str) -> None:
    with pytest.raises(BackendRateLimited) as caught:
        asyncio.run(collect(backend(script, mode)))
    assert type(caught.value) is BackendRateLimited  # the breaker reads its code, rate_limited
    assert caught.value.retry_after == 45 * 60
    assert "usage limit reached" in str(caught.value)


def test_a_failed_exit_is_unavailable_with_stderr_and_no_secret(
    script: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLI_TOKEN", "tok-PLANTED-5e6f7a8b")
    with pytest.raises(BackendUnavailable) as caught:
        asyncio.run(collect(backend(script, "fail")))
    message = str(caught.value)
    assert "exited with 2" in message and "login refused" in message
    assert "tok-PLANTED-5e6f7a8b" not in message and "***" in message


def test_a_missing_command_is_unavailable_and_unhealthy(tmp_path: Path) -> None:
    spec = backend_spec(kind="cli", command=("no-such-agent-cli",), models=(MODEL,))
    assert isinstance(spec, CliSpec)
    b = AgentCliBackend("agent", invocation_for(spec), spec.models)
    with pytest.raises(BackendUnavailable, match="no-such-agent-cli"):
        asyncio.run(b.inventory())
    with pytest.raises(BackendUnavailable, match="no-such-agent-cli"):
        asyncio.run(collect(b))


def test_inventory_lists_the_configured_models_as_ready(script: Path) -> None:
    models = asyncio.run(backend(script, "stream").inventory())
    assert [(m.name, m.loaded, m.serves_chat()) for m in models] == [(MODEL, True, True)]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cancel_kills_the_cli_and_everything_it_started(
    script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("FAKE_CLI_PIDS", str(pids_file))

    async def cancel_after_first_token() -> list[Chunk]:
        got: list[Chunk] = []

        async def consume() -> None:
            async for chunk in backend(script, "hang").stream_chat(MODEL, PROMPT, OPTIONS):
                got.append(chunk)

        task = asyncio.create_task(consume())
        for _ in range(400):
            if got:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    got = asyncio.run(cancel_after_first_token())
    assert [c.text for c in got] == ["thinking"]
    leader, child = (int(p) for p in pids_file.read_text().split())
    # The group is the leader's pid (start_new_session); the child was in it too.
    wait_until(lambda: not _group_alive(leader), 10, "the CLI's process group to be gone")
    for pid in (leader, child):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_prompt_never_goes_on_the_command_line(script: Path) -> None:
    spec = backend_spec(kind="cli", preset="claude", models=(MODEL,))
    assert isinstance(spec, CliSpec)
    argv = invocation_for(spec).argv(MODEL)
    assert argv[:2] == ["claude", "-p"] and argv[-2:] == ["--model", MODEL]
    assert "count to three" not in " ".join(argv)


def test_presets_build_for_every_cli() -> None:
    for preset, program in (("codex", "codex"), ("gemini", "gemini"), ("opencode", "opencode")):
        spec = backend_spec(kind="cli", preset=preset, models=("m",))
        assert isinstance(spec, CliSpec)
        assert invocation_for(spec).argv("m")[0] == program


def test_a_secret_on_the_command_line_stops_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-PLANTED-cmdline-1234")
    config = build_worker_config(
        None,
        name="n",
        backends=(
            backend_spec(
                kind="cli",
                command=("claude", "--key", "sk-ant-PLANTED-cmdline-1234"),
                models=("m",),
            ),
        ),
    )
    with pytest.raises(ConfigError, match="command line") as caught:
        build_backends(config, httpx.AsyncClient())
    assert "PLANTED" not in str(caught.value)


def test_a_cli_spec_needs_a_command_or_preset() -> None:
    spec = backend_spec(kind="cli", models=("m",))
    assert isinstance(spec, CliSpec)
    with pytest.raises(ConfigError, match="preset or a command"):
        invocation_for(spec)


def test_reset_times_in_the_usual_wordings() -> None:
    now = dt.datetime(2026, 12, 2, 13, 0, tzinfo=dt.UTC)
    assert retry_after_in("try again in 2h 5m", now) == 2 * 3600 + 300
    assert retry_after_in("Rate limited. Retry after 30 seconds.", now) == 30
    assert retry_after_in("5-hour limit reached - resets 3pm", now) == 2 * 3600
    assert retry_after_in("limit reached, resets at 09:30", now) == (20 * 60 + 30) * 60
    epoch = int(now.timestamp()) + 600
    assert retry_after_in(f"Claude AI usage limit reached|{epoch}", now) == 600
    assert retry_after_in("usage limit reached", now) is None


def test_tools_and_images_are_refused_not_dropped(script: Path) -> None:
    """An agent CLI takes a text prompt: unlike the Anthropic and Gemini adapters, it cannot
    pass tools or images on, so it says so (and the router never sends it such a job: its
    models report only the chat capability)."""
    tool = ToolDefinition.model_validate({"type": "function", "function": {"name": "now"}})

    async def with_tools() -> None:
        async for _ in backend(script, "stream").stream_chat(MODEL, PROMPT, OPTIONS, [tool]):
            pass

    with pytest.raises(UnsupportedRequest, match="does not pass tool calls on"):
        asyncio.run(with_tools())
    inventory = asyncio.run(backend(script, "stream").inventory())
    assert all(m.capabilities == {"chat"} for m in inventory)
