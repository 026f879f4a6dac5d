"""What a gateway client sees when things go wrong: no node up, a node failing before its
first token, a bad API key, and what a client that hangs up does to its job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.controller.gateway.conftest import FAST, running_gateway, wait_for_models
from tests.fakes.fake_ollama import FakeOllama, running_fake_ollama
from tests.support.servers import REPO_ROOT, start_worker

LONG_REPLY = " ".join(f"word{i}" for i in range(80))


@contextmanager
def openai_client(base_url: str, key: str = "unused") -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        yield client


def test_no_node_up_is_a_503_with_retry_after(broker_url: str, tmp_path: Path) -> None:
    with running_gateway(broker_url, tmp_path) as gw:
        node = start_worker(broker_url, "gone", *FAST, log_dir=tmp_path)
        wait_for_models(gw, {"sim-small"})
        node.stop()
        with pytest.raises(openai.InternalServerError) as caught, openai_client(gw.v1) as client:
            client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"].isdigit()
        answer = httpx.post(gw.url + "/api/chat", json={"model": "x", "messages": []}, timeout=5)
        assert answer.status_code == 404  # Ollama's load request for a model nobody has
        assert answer.json() == {"error": "model 'x' not found"}


def test_a_node_failing_before_its_first_token_becomes_another_nodes_answer(
    broker_url: str, tmp_path: Path
) -> None:
    aliases = json.dumps({"coder": ["broken:7b", "good:7b"]})
    with (
        running_fake_ollama(["broken:7b"], error_after=0) as broken,
        running_fake_ollama(["good:7b"], reply="all good here") as good,
    ):
        nodes = [
            start_worker(broker_url, "broken", "--ollama", broken.url, log_dir=tmp_path),
            start_worker(broker_url, "good", "--ollama", good.url, log_dir=tmp_path),
        ]
        try:
            env = {"CORRAL_ALIASES": aliases}
            with running_gateway(broker_url, tmp_path, env=env) as gw, ExitStack() as stack:
                wait_for_models(gw, {"broken:7b", "good:7b"})
                client = stack.enter_context(openai_client(gw.v1))
                raw = client.chat.completions.with_raw_response.create(
                    model="coder",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                )
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
                assert raw.headers["x-corral-node"] == "good"
                assert text == "all good here"
                assert [r.path for r in broken.state.requests].count("/api/chat") == 1
                # With nowhere else to go, the failure is an HTTP error, not an empty 200.
                with pytest.raises(openai.APIStatusError) as caught:
                    client.chat.completions.create(
                        model="broken:7b", messages=[{"role": "user", "content": "hi"}], stream=True
                    )
                assert caught.value.status_code >= 500
        finally:
            for node in nodes:
                node.stop()


def test_a_client_that_hangs_up_cancels_its_job(broker_url: str, tmp_path: Path) -> None:
    with running_fake_ollama(["slow:1b"], reply=LONG_REPLY, token_delay=0.1) as fake:
        node = start_worker(broker_url, "slow", "--ollama", fake.url, log_dir=tmp_path)
        try:
            with running_gateway(broker_url, tmp_path) as gw:
                wait_for_models(gw, {"slow:1b"})
                requests = (
                    (gw.v1 + "/chat/completions", {"model": "slow:1b", "stream": True}),
                    (gw.url + "/api/chat", {"model": "slow:1b"}),  # Ollama streams by default
                )
                for number, (url, body) in enumerate(requests, start=1):
                    messages = [{"role": "user", "content": "count"}]
                    with httpx.stream("POST", url, json={**body, "messages": messages}) as r:
                        assert r.status_code == 200
                        lines = r.iter_lines()
                        assert "word0" in next(line for line in lines if line.strip())
                    # Closed after the first token: the backend's stream must stop.
                    assert fake.wait_until(lambda s, n=number: s.aborted_streams == n, 10)
                # Not streamed: a client that gives up waiting for the whole answer.
                body = {"model": "slow:1b", "messages": [{"role": "user", "content": "count"}]}
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(gw.v1 + "/chat/completions", json=body, timeout=1.0)
                assert fake.wait_until(lambda s: s.aborted_streams == 3, 10)
                assert fake.state.streams_completed == 0
        finally:
            node.stop()


def test_a_client_that_hangs_up_before_the_first_token_cancels_its_job(
    broker_url: str, tmp_path: Path
) -> None:
    """The status line is held for the first token: a client that gives up during that wait
    stops the job too, on both APIs, and the gateway goes on serving."""

    async def hang_up_once_generating(fake: FakeOllama, url: str, body: dict[str, Any]) -> None:
        started = fake.state.streams_started
        async with httpx.AsyncClient(timeout=30) as client:
            request = asyncio.ensure_future(client.post(url, json=body))
            async with asyncio.timeout(10):
                while fake.state.streams_started == started:
                    await asyncio.sleep(0.02)
            assert not request.done()  # no status line yet: the first token is 3 s away
            request.cancel()  # closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await request

    with running_fake_ollama(["slow:1b"], first_token_delay=3.0) as fake:
        node = start_worker(broker_url, "slow", "--ollama", fake.url, log_dir=tmp_path)
        try:
            with running_gateway(broker_url, tmp_path) as gw:
                wait_for_models(gw, {"slow:1b"})
                requests = (
                    (gw.v1 + "/chat/completions", {"model": "slow:1b", "stream": True}),
                    (gw.url + "/api/chat", {"model": "slow:1b"}),
                )
                for number, (url, body) in enumerate(requests, start=1):
                    messages = [{"role": "user", "content": "count"}]
                    asyncio.run(hang_up_once_generating(fake, url, {**body, "messages": messages}))
                    assert fake.wait_until(lambda s, n=number: s.aborted_streams == n, 10)
                assert fake.state.streams_completed == 0
                assert httpx.get(gw.v1 + "/models", timeout=5).status_code == 200
        finally:
            node.stop()


def test_api_keys_are_required_when_set_and_off_loopback(broker_url: str, tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "controller.gateway", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "CORRAL_BROKER_URL": broker_url},
    )
    assert refused.returncode == 2
    assert "CORRAL_API_KEYS" in refused.stderr
    with running_gateway(broker_url, tmp_path, env={"CORRAL_API_KEYS": "k-one, k-two"}) as gw:
        with (
            pytest.raises(openai.AuthenticationError) as caught,
            openai_client(gw.v1, "k-3") as bad,
        ):
            bad.models.list()
        assert caught.value.status_code == 401
        assert caught.value.response.headers["www-authenticate"].startswith("Bearer")
        assert "k-3" not in caught.value.response.text
        for key in ("k-one", "k-two"):
            with openai_client(gw.v1, key) as good:
                assert good.models.list().data == []
        ollama_answer = httpx.get(gw.url + "/api/tags", timeout=5)
        assert ollama_answer.status_code == 401
        assert "API key" in ollama_answer.json()["error"]
        assert httpx.get(gw.url + "/", timeout=5).text == "Ollama is running"
        assert "k-one" not in gw.log() and "k-two" not in gw.log()


def test_corral_serve_execs_the_gateway_with_the_broker_flag(
    broker_url: str, tmp_path: Path
) -> None:
    command = ("-m", "controller", "--broker", broker_url, "serve")
    env = {"CORRAL_BROKER_URL": "redis://127.0.0.1:1/0"}  # wrong: the flag must win
    with running_gateway(broker_url, tmp_path, env=env, command=command) as gw:
        node = start_worker(broker_url, "served", *FAST, log_dir=tmp_path)
        try:
            wait_for_models(gw, {"sim-small"})
        finally:
            node.stop()


def test_a_gateway_that_stops_cancels_the_jobs_it_was_streaming(
    broker_url: str, tmp_path: Path
) -> None:
    with running_fake_ollama(["slow:1b"], reply=LONG_REPLY, token_delay=0.1) as fake:
        node = start_worker(broker_url, "slow", "--ollama", fake.url, log_dir=tmp_path)
        try:
            with running_gateway(broker_url, tmp_path) as gw:
                wait_for_models(gw, {"slow:1b"})
                body = {"model": "slow:1b", "messages": [{"role": "user", "content": "count"}]}
                with httpx.stream("POST", gw.url + "/api/chat", json=body, timeout=30) as r:
                    assert "word0" in next(line for line in r.iter_lines() if line.strip())
                    gw.process.send_signal(signal.SIGTERM)  # past its 5 s grace, it cancels
                    # uvicorn exits by re-raising the signal once it has shut down.
                    assert gw.process.wait(timeout=20) in (0, -signal.SIGTERM)
                assert fake.wait_until(lambda s: s.aborted_streams == 1, 10)
                assert fake.state.streams_completed == 0
        finally:
            node.stop()


def test_redis_out_of_reach_is_a_503_that_hides_the_password(tmp_path: Path) -> None:
    unreachable = "redis://:hunter2-secret@127.0.0.1:1/0"
    with running_gateway(unreachable, tmp_path) as gw:
        answer = httpx.get(gw.v1 + "/models", timeout=10)
        assert answer.status_code == 503
        assert answer.headers["retry-after"].isdigit()
        assert "cannot reach Redis" in answer.json()["error"]["message"]
        assert "hunter2" not in answer.text and "hunter2" not in gw.log()


def text_until_error(parts: Iterator[str]) -> tuple[str, Exception | None]:
    """The text a client shows, and the error its library raised mid-stream (if any)."""
    text = ""
    try:
        for part in parts:
            text += part
    except (openai.APIError, ollama.ResponseError) as exc:
        return text, exc
    return text, None


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error(
    broker_url: str, tmp_path: Path
) -> None:
    with running_fake_ollama(["flaky:1b"], reply=LONG_REPLY, error_after=3) as fake:
        node = start_worker(broker_url, "flaky", "--ollama", fake.url, log_dir=tmp_path)
        try:
            with running_gateway(broker_url, tmp_path) as gw, openai_client(gw.v1) as client:
                wait_for_models(gw, {"flaky:1b"})
                messages: list[Any] = [{"role": "user", "content": "count"}]
                chunks = client.chat.completions.create(
                    model="flaky:1b", messages=messages, stream=True
                )
                text, error = text_until_error(c.choices[0].delta.content or "" for c in chunks)
                assert text.startswith("word0")
                assert isinstance(error, openai.APIError) and "llama runner" in str(error)
                with ollama.Client(host=gw.url) as ollama_client:
                    parts = ollama_client.chat(model="flaky:1b", messages=messages, stream=True)
                    text, error = text_until_error(p.message.content or "" for p in parts)
                assert text.startswith("word0")
                assert isinstance(error, ollama.ResponseError) and "llama runner" in str(error)
        finally:
            node.stop()
