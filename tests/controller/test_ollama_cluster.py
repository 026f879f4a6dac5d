"""A cluster fronting Ollama, end to end: real worker processes, the CLI, the fake Ollama.

Each test starts its own worker (``python -m worker --ollama URL``) in front of a fake Ollama on
loopback, on a fresh Redis database, and checks what a user at the terminal would check: what
``corral nodes`` shows, what ``corral ask`` prints and exits with, and, for cancels, that the
backend's HTTP stream really was closed (the fake counts streams its client abandoned).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from broker.schemas import DeltaEvent, DoneEvent, ErrorEvent, StartedEvent
from broker.settings import build_settings
from controller.cli import ExitCode
from controller.client import CorralClient, make_spec
from tests.fakes import serve_in_thread
from tests.fakes.fake_ollama import (
    DEFAULT_REPLY,
    FakeModel,
    FakeOllama,
    FakeOllamaState,
    RecordedRequest,
    build_app,
    canonical,
    running_fake_ollama,
)
from tests.support.servers import REPO_ROOT, WorkerProcess, free_port, start_worker, wait_until

MODELS = ("llama3.2:1b", "qwen2.5:0.5b")
# Slow enough that a cancel lands mid-stream, short enough that a missed cancel fails fast.
LONG_REPLY = " ".join(f"word{i}" for i in range(60))
SLOW_TOKEN_S = 0.15


# --- helpers -------------------------------------------------------------------------------


def corral(broker_url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``corral ARGS`` as a user runs it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_cli_env(broker_url),
        cwd=REPO_ROOT,
    )


def _cli_env(broker_url: str) -> dict[str, str]:
    env = {**os.environ, "CORRAL_BROKER_URL": broker_url}
    env.pop("CORRAL_CONFIG", None)
    return env


def flat(text: str) -> str:
    """Whitespace folded: rich wraps stderr at 80 columns when it is not a terminal."""
    return " ".join(text.split())


def nodes_json(broker_url: str) -> dict[str, dict[str, Any]]:
    result = corral(broker_url, "nodes", "--json")
    assert result.returncode == ExitCode.OK, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return {row["name"]: row for row in rows}


def chat_requests(fake: FakeOllama) -> list[RecordedRequest]:
    return [r for r in fake.state.requests if r.path == "/api/chat"]


@contextmanager
def ollama_worker(
    broker_url: str, name: str, ollama_url: str, log_dir: Path, *extra: str
) -> Iterator[WorkerProcess]:
    worker = start_worker(broker_url, name, "--ollama", ollama_url, *extra, log_dir=log_dir)
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def client(broker_url: str) -> Iterator[CorralClient]:
    with CorralClient(build_settings(broker_url=broker_url)) as c:
        yield c


@dataclass
class ChatSwitch:
    """Makes only ``/api/chat`` fail, as when Ollama's model runner crashes: the model list
    (``/api/tags``, ``/api/ps``) still answers, so the node keeps looking healthy."""

    status: int | None = None
    message: str = "llama runner process has terminated: signal: killed"


@contextmanager
def fake_ollama_with_chat_switch(
    models: tuple[str, ...] = MODELS,
) -> Iterator[tuple[FakeOllama, ChatSwitch]]:
    state = FakeOllamaState(models={canonical(m): FakeModel(canonical(m)) for m in models})
    switch = ChatSwitch()
    inner = build_app(state)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/api/chat" and switch.status is not None:
            raw = b""
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            state.requests.append(RecordedRequest("POST", "/api/chat", json.loads(raw or b"{}")))
            response = JSONResponse({"error": switch.message}, status_code=switch.status)
            await response(scope, receive, send)
            return
        await inner(scope, receive, send)

    with serve_in_thread(app) as url:
        yield FakeOllama(url=url, state=state), switch


@dataclass
class LiveCli:
    """A ``corral`` process whose stdout and stderr are read as they are written."""

    process: subprocess.Popen[bytes]
    _out: bytearray = field(default_factory=bytearray)
    _err: bytearray = field(default_factory=bytearray)
    _readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for pipe, buffer in ((self.process.stdout, self._out), (self.process.stderr, self._err)):
            reader = threading.Thread(target=_drain, args=(pipe, buffer), daemon=True)
            reader.start()
            self._readers.append(reader)

    @property
    def stdout(self) -> str:
        return bytes(self._out).decode(errors="replace")

    @property
    def stderr(self) -> str:
        return bytes(self._err).decode(errors="replace")

    def finish(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _drain(pipe: IO[bytes], buffer: bytearray) -> None:
    while chunk := os.read(pipe.fileno(), 4096):
        buffer.extend(chunk)
    pipe.close()


@contextmanager
def live_corral(broker_url: str, *args: str) -> Iterator[LiveCli]:
    process = subprocess.Popen(
        [sys.executable, "-m", "controller", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_cli_env(broker_url),
        cwd=REPO_ROOT,
    )
    live = LiveCli(process)
    try:
        yield live
    finally:
        live.kill()
        live.finish(timeout_s=5)


# --- the tests -----------------------------------------------------------------------------


def test_nodes_json_shows_the_ollama_models_installed_and_loaded(
    broker_url: str, tmp_path: Path
) -> None:
    with (
        running_fake_ollama(MODELS, loaded=("qwen2.5:0.5b",)) as fake,
        ollama_worker(broker_url, "pi1", fake.url, tmp_path, "--tags", "arm"),
    ):
        nodes = nodes_json(broker_url)
    assert set(nodes) == {"pi1"}
    node = nodes["pi1"]
    assert node["up"] is True
    assert node["tags"] == ["arm"]
    [backend] = node["backends"]
    assert backend["kind"] == "ollama"
    assert backend["healthy"] is True and backend["error"] is None
    assert backend["url"] == fake.url
    assert {m["name"]: m["loaded"] for m in backend["models"]} == {
        "llama3.2:1b": False,
        "qwen2.5:0.5b": True,
    }
    qwen = next(m for m in backend["models"] if m["name"] == "qwen2.5:0.5b")
    assert qwen["family"] == "llama" and qwen["quantization"] == "Q8_0"


def test_ask_prints_the_backends_reply_and_a_summary_naming_node_and_model(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with (
        running_fake_ollama(MODELS) as fake,
        ollama_worker(broker_url, "pi1", fake.url, tmp_path),
    ):
        result = corral(broker_url, "ask", "--model", "llama3.2:1b", "@pi1 why is the sky blue")
        assert result.returncode == ExitCode.OK, result.stderr
        assert result.stdout == DEFAULT_REPLY + "\n"
        summary = flat(result.stderr)
        assert "node pi1" in summary and "model llama3.2:1b" in summary
        assert "ollama" in summary and "tokens" in summary
        body = fake.state.last_body("/api/chat")
        assert body["model"] == "llama3.2:1b"
        assert body["messages"] == [{"role": "user", "content": "why is the sky blue"}]
        # The model is in memory now, and the next heartbeat says so.
        wait_until(
            lambda: any(
                m.name == "llama3.2:1b" and m.loaded
                for n in client.nodes()
                for b in n.info.backends
                for m in b.models
            ),
            5,
            "llama3.2:1b to show as loaded",
        )


def test_a_backend_http_500_fails_the_job_with_exit_4_and_the_node_keeps_serving(
    broker_url: str, tmp_path: Path
) -> None:
    with (
        fake_ollama_with_chat_switch() as (fake, switch),
        ollama_worker(broker_url, "pi1", fake.url, tmp_path) as worker,
    ):
        switch.status = 500
        failed = corral(broker_url, "ask", "@pi1", "hello")
        assert failed.returncode == ExitCode.BACKEND, failed.stderr
        message = flat(failed.stderr)
        assert "job failed on node pi1" in message
        assert "HTTP 500" in message and switch.message in message
        assert failed.stdout.strip() == ""

        switch.status = None
        assert worker.process.poll() is None
        ok = corral(broker_url, "ask", "@pi1", "hello again")
        assert ok.returncode == ExitCode.OK, ok.stderr
        assert ok.stdout == DEFAULT_REPLY + "\n"
        assert len(chat_requests(fake)) == 2


def test_a_backend_refusing_connections_shows_unhealthy_and_ask_exits_3(
    broker_url: str, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with ollama_worker(broker_url, "pi1", closed, tmp_path):
        node = nodes_json(broker_url)["pi1"]
        assert node["up"] is True
        [backend] = node["backends"]
        assert backend["healthy"] is False
        assert "cannot connect" in backend["error"]
        assert backend["models"] == []

        result = corral(broker_url, "ask", "@pi1", "hi")
    assert result.returncode == ExitCode.NO_ROUTE, result.stderr
    assert "no up node has a healthy backend" in flat(result.stderr)
    assert "pi1/ollama: cannot connect" in flat(result.stderr)  # says which backend and why
    assert result.stdout == ""


def test_cancel_from_the_cli_ends_the_stream_and_closes_the_backend_stream(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    with (
        running_fake_ollama(MODELS, reply=LONG_REPLY, token_delay=SLOW_TOKEN_S) as fake,
        ollama_worker(broker_url, "pi1", fake.url, tmp_path),
    ):
        submission = client.submit(make_spec("tell me a long story", node="pi1"))
        events = submission.events(timeout_s=10)
        started = next(events)
        assert isinstance(started, StartedEvent) and started.node == "pi1"
        first = next(events)
        assert isinstance(first, DeltaEvent) and first.text == "word0"

        cancelled = corral(broker_url, "cancel", submission.job_id)
        assert cancelled.returncode == ExitCode.OK, cancelled.stderr
        assert f"cancel sent for job {submission.job_id}" in cancelled.stdout
        sent_at = time.monotonic()

        rest = list(events)
        assert isinstance(rest[-1], ErrorEvent), rest[-1]
        assert rest[-1].code == "cancelled" and rest[-1].node == "pi1"
        assert all(isinstance(e, DeltaEvent) for e in rest[:-1])
        assert len(rest) - 1 < len(LONG_REPLY.split()) - 1  # it stopped early
        assert time.monotonic() - sent_at < 3
        assert fake.wait_until(lambda s: s.aborted_streams == 1, timeout=5)
        assert fake.state.streams_completed == 0


def test_ctrl_c_cancels_the_job_and_attach_shows_the_partial_answer(
    broker_url: str, tmp_path: Path
) -> None:
    with (
        running_fake_ollama(MODELS, reply=LONG_REPLY, token_delay=SLOW_TOKEN_S) as fake,
        ollama_worker(broker_url, "pi1", fake.url, tmp_path),
    ):
        with live_corral(broker_url, "ask", "@pi1", "count slowly") as ask:
            wait_until(lambda: "word0" in ask.stdout, 15, "the first token on stdout")
            ask.process.send_signal(signal.SIGINT)
            code = ask.finish(timeout_s=10)
            assert code == ExitCode.INTERRUPTED, ask.stderr
            match = re.search(r"job ([0-9a-f]{32}) → pi1", ask.stderr)
            assert match, ask.stderr
            job_id = match.group(1)
            assert f"cancelled job {job_id}" in flat(ask.stderr)
            printed = ask.stdout.strip()

        assert fake.wait_until(lambda s: s.aborted_streams == 1, timeout=5)
        assert fake.state.streams_completed == 0

        attached = corral(broker_url, "attach", job_id, "--timeout", "5")
    assert attached.returncode == ExitCode.INTERRUPTED, attached.stderr
    partial = attached.stdout.strip()
    assert partial.startswith(printed)  # everything ask showed, maybe a token or two more
    assert LONG_REPLY.startswith(partial) and partial != LONG_REPLY
    assert "job failed on node pi1: job cancelled" in flat(attached.stderr)


def test_a_job_cancelled_while_queued_never_reaches_the_backend(
    broker_url: str, tmp_path: Path, client: CorralClient
) -> None:
    reply = " ".join(f"tok{i}" for i in range(10))
    with (
        running_fake_ollama(MODELS, reply=reply, token_delay=0.1) as fake,
        ollama_worker(broker_url, "pi1", fake.url, tmp_path, "--capacity", "1"),
    ):
        first = client.submit(make_spec("first", node="pi1"))
        first_events = first.events(timeout_s=10)
        assert isinstance(next(first_events), StartedEvent)
        assert isinstance(next(first_events), DeltaEvent)

        second = client.submit(make_spec("second", node="pi1"))
        assert client.cancel(second.job_id) is True

        rest = list(first_events)
        assert isinstance(rest[-1], DoneEvent) and rest[-1].result.text == reply
        second_events = list(second.events(timeout_s=10))
        assert len(second_events) == 1, second_events
        assert isinstance(second_events[0], ErrorEvent)
        assert second_events[0].code == "cancelled"
        assert second_events[0].message == "job cancelled before it started"

        assert [r.body["messages"][0]["content"] for r in chat_requests(fake)] == ["first"]
        assert fake.state.streams_started == 1


def test_an_unknown_model_exits_3_naming_the_models_available(
    broker_url: str, tmp_path: Path
) -> None:
    with (
        running_fake_ollama(MODELS) as fake,
        ollama_worker(broker_url, "pi1", fake.url, tmp_path),
    ):
        result = corral(broker_url, "ask", "--model", "mistral:7b", "hi")
        assert chat_requests(fake) == []
    assert result.returncode == ExitCode.NO_ROUTE, result.stderr
    message = flat(result.stderr)
    assert "'mistral:7b' is not installed on any node" in message
    assert "available: llama3.2:1b, qwen2.5:0.5b" in message
