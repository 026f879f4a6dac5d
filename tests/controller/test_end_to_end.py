"""The core path on real parts: redis-server, worker processes, the client and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker import names
from broker.errors import NoNodeAvailable, RequestTooLarge, UnknownModel, UnknownNode
from broker.schemas import ChatMessage, DeltaEvent, DoneEvent, ErrorEvent, StartedEvent
from broker.settings import build_settings
from controller.client import CorralClient, make_spec
from tests.support.servers import (
    REPO_ROOT,
    WorkerProcess,
    running_workers,
    start_worker,
    wait_until,
)
from worker.backends.simulated import reply_for

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]


def expected_reply(prompt: str) -> str:
    return reply_for([ChatMessage(role="user", content=prompt)])


@pytest.fixture(scope="module")
def cluster(module_broker_url: str, module_log_dir: Path) -> Iterator[list[WorkerProcess]]:
    with running_workers(
        module_broker_url,
        module_log_dir,
        ("alpha", [*FAST, "--tags", "code"]),
        ("beta", [*FAST, "--tags", "chat"]),
    ) as workers:
        yield workers


@pytest.fixture
def client(module_broker_url: str, cluster: list[WorkerProcess]) -> Iterator[CorralClient]:
    with CorralClient(build_settings(broker_url=module_broker_url)) as c:
        wait_until(lambda: sum(n.up for n in c.nodes()) == 2, 10, "both nodes up")
        yield c


def corral(
    broker_url: str,
    *args: str,
    timeout: float = 60,
    stdin: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CORRAL_BROKER_URL": broker_url, **(env or {})},
        cwd=REPO_ROOT,
    )


def test_nodes_report_tags_backends_and_models(client: CorralClient) -> None:
    nodes = {n.name: n for n in client.nodes()}
    assert set(nodes) == {"alpha", "beta"}
    assert nodes["alpha"].info.tags == {"code"}
    backend = nodes["alpha"].info.backends[0]
    assert backend.kind == "simulated" and backend.healthy
    assert [m.name for m in backend.models] == ["sim-small", "sim-large"]


def test_a_tagged_job_streams_every_token_in_order_from_the_tagged_node(
    client: CorralClient,
) -> None:
    events = list(client.stream(make_spec("write a haiku", tags=frozenset({"code"}))))
    assert isinstance(events[0], StartedEvent) and events[0].node == "alpha"
    assert [e.seq for e in events] == list(range(len(events)))
    text = "".join(e.text for e in events if isinstance(e, DeltaEvent))
    assert text == expected_reply("write a haiku")
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.result.text == text and done.result.node == "alpha"
    assert done.result.usage.completion_tokens == len(text.split(" "))


def test_a_fresh_job_is_followed_live_without_a_read_of_its_replay_log(
    module_broker_url: str, client: CorralClient
) -> None:
    # The subscription goes out before the job: its first event comes live, so the client
    # spends no round trip on the log (a gap or a quiet wait would still read it).
    db = redis.Redis.from_url(module_broker_url)

    def log_reads() -> int:
        return int(db.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))

    before = log_reads()
    events = list(client.stream(make_spec("hello there")))
    assert [e.seq for e in events] == list(range(len(events)))
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].result.text == expected_reply("hello there")
    assert log_reads() == before


def test_routing_errors_say_what_is_wrong(client: CorralClient) -> None:
    with pytest.raises(UnknownNode, match="no node named 'pi9'"):
        client.submit(make_spec("hi", node="pi9"))
    with pytest.raises(UnknownModel, match=r"'llama3\.1:8b' is not installed"):
        client.submit(make_spec("hi", model="llama3.1:8b"))
    with pytest.raises(NoNodeAvailable, match=r"no up node or model has the tags gpu"):
        client.submit(make_spec("hi", tags=frozenset({"gpu"})))


def test_cli_ask_with_route_prefix_prints_tokens_then_summary(
    module_broker_url: str, client: CorralClient
) -> None:
    result = corral(module_broker_url, "ask", "@beta", "why is the sky blue")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_reply("why is the sky blue")
    assert "node beta" in result.stderr
    assert (
        "model sim-small" in result.stderr
        and "tokens" in result.stderr
        and "first token" in result.stderr
    )


def test_cli_json_prints_one_event_per_line(module_broker_url: str, client: CorralClient) -> None:
    result = corral(module_broker_url, "ask", "--json", "--tag", "chat", "hello")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["type"] == "started" and events[0]["node"] == "beta"
    assert events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_cli_exit_codes_tell_no_route_apart(module_broker_url: str, client: CorralClient) -> None:
    unknown = corral(module_broker_url, "ask", "@nowhere", "hi")
    assert unknown.returncode == 3
    assert "no node named 'nowhere'" in unknown.stderr
    model = corral(module_broker_url, "ask", "--model", "nope:1b", "hi")
    assert model.returncode == 3
    assert "'nope:1b' is not installed" in model.stderr
    bad_flag = corral(module_broker_url, "ask", "--frobnicate", "hi")
    assert bad_flag.returncode == 2
    assert "No such option" in bad_flag.stderr
    empty_model = corral(module_broker_url, "ask", "--model", "", "a private prompt")
    assert empty_model.returncode == 2
    assert "invalid job: model: String should have at least 1 character" in empty_model.stderr
    assert "Traceback" not in empty_model.stderr and "private" not in empty_model.stderr


def test_attach_replays_a_finished_job_exactly_once(
    module_broker_url: str, client: CorralClient
) -> None:
    spec = make_spec("tell me about redis")
    original = list(client.stream(spec))
    replayed = list(client.attach(spec.job_id).events(timeout_s=5))
    assert replayed == original
    cli = corral(module_broker_url, "attach", spec.job_id)
    assert cli.returncode == 0
    assert cli.stdout.strip() == expected_reply("tell me about redis")


def test_attach_to_an_unknown_job(module_broker_url: str, client: CorralClient) -> None:
    result = corral(module_broker_url, "attach", "0123456789abcdef")
    assert result.returncode == 5
    assert "no job 0123456789abcdef" in result.stderr


def test_nodes_command_shows_a_table(module_broker_url: str, client: CorralClient) -> None:
    result = corral(module_broker_url, "nodes")
    assert result.returncode == 0, result.stderr
    for text in ("alpha", "beta", "up", "code", "sim-small*", "simulated"):
        assert text in result.stdout


def test_a_pickled_message_is_refused_and_the_worker_keeps_serving(
    client: CorralClient, cluster: list[WorkerProcess]
) -> None:
    import pickle

    from kombu import Connection

    with Connection(client.settings.broker_url.get_secret_value()) as conn:
        queue = conn.SimpleQueue(names.node_queue("alpha"))
        queue.put(
            pickle.dumps({"boom": True}),
            serializer=None,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": names.RUN_JOB_TASK, "id": "pickled-1"},
        )
        queue.close()
    alpha = cluster[0]
    wait_until(
        lambda: "application/x-python-serialize" in alpha.log(), 10, "the refusal in the log"
    )
    events = list(client.stream(make_spec("still there?", node="alpha")))
    assert isinstance(events[-1], DoneEvent)


def test_a_malformed_job_fails_its_client_fast_and_nothing_else(client: CorralClient) -> None:
    spec = make_spec("hi", node="beta")
    reader = client._subscribe(spec.job_id, "beta")
    client.app.send_task(
        names.RUN_JOB_TASK,
        args=[{"spec": {"job_id": spec.job_id}, "node": "beta"}],
        queue=names.node_queue("beta"),
        task_id=spec.job_id,
        ignore_result=True,
    )
    events = list(reader.events(timeout_s=10))
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    assert events[0].code == "malformed"
    # The message names what is missing (an embed job needs no messages, so they are not it).
    assert "spec.created_at: Field required" in events[0].message
    ok = list(client.stream(make_spec("and now a good one", node="beta")))
    assert isinstance(ok[-1], DoneEvent)


def test_stopped_worker_shows_down_and_killed_worker_within_three_heartbeats(
    broker_url: str, tmp_path: Path
) -> None:
    calm = start_worker(broker_url, "calm", *FAST, log_dir=tmp_path)
    doomed = start_worker(broker_url, "doomed", *FAST, log_dir=tmp_path)
    with CorralClient(build_settings(broker_url=broker_url)) as c:
        wait_until(lambda: sum(n.up for n in c.nodes()) == 2, 10, "both up")
        assert calm.stop(signal.SIGTERM) == 0
        assert {n.name: n.up for n in c.nodes()}["calm"] is False  # a clean stop is immediate
        killed_at = time.monotonic()
        doomed.stop(signal.SIGKILL)
        wait_until(lambda: not {n.name: n.up for n in c.nodes()}["doomed"], 5, "doomed down")
        assert time.monotonic() - killed_at <= 3 * 0.5 + 0.5
        result = corral(broker_url, "nodes")
        assert result.stdout.count("down") >= 2


def test_wrong_redis_password_fails_fast_without_printing_it(
    redis_server: object, tmp_path: Path
) -> None:
    from tests.support.servers import start_redis

    guarded = start_redis(password="correct-horse")
    try:
        url = f"redis://:wrong-battery@127.0.0.1:{guarded.port}/0"
        started = time.monotonic()
        worker = start_worker(url, "locked", *FAST, log_dir=tmp_path, wait_ready=False)
        code = worker.process.wait(timeout=20)
        elapsed = time.monotonic() - started
        log = worker.log()
        worker.stop()
        assert code == 2
        assert "refused the password" in log
        assert "wrong-battery" not in log and "correct-horse" not in log
        assert elapsed < 10
        cli = corral(url, "nodes")
        assert cli.returncode == 6 and "refused the password" in cli.stderr
        assert "wrong-battery" not in cli.stderr + cli.stdout
    finally:
        guarded.stop()


def test_cli_reads_the_prompt_from_standard_input(
    module_broker_url: str, client: CorralClient
) -> None:
    piped = corral(module_broker_url, "ask", "--node", "beta", stdin="why is the sky blue\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == expected_reply("why is the sky blue")

    framed = corral(module_broker_url, "ask", "@beta", "Summarise:", "-", stdin="notes\nmore\n")
    assert framed.returncode == 0, framed.stderr
    assert framed.stdout.strip() == expected_reply("Summarise:\nnotes\nmore")

    empty = corral(module_broker_url, "ask", "-", stdin="  \n")
    assert empty.returncode == 2
    assert "the prompt is empty" in empty.stderr


def test_an_oversized_prompt_is_refused_before_it_reaches_redis(
    module_broker_url: str, client: CorralClient
) -> None:
    r = redis.Redis.from_url(module_broker_url)
    keys_before = set(r.keys())
    secret_text = "private words " * 1000  # 14 KB
    cli = corral(
        module_broker_url, "ask", "-", stdin=secret_text, env={"CORRAL_MAX_PROMPT_BYTES": "4096"}
    )
    assert cli.returncode == 2
    assert "the prompt on standard input is over the limit of 4 KiB" in cli.stderr
    assert "CORRAL_MAX_PROMPT_BYTES" in cli.stderr
    assert "private" not in cli.stderr + cli.stdout and "Traceback" not in cli.stderr

    small = build_settings(broker_url=module_broker_url, max_prompt_bytes=4096)
    with (
        CorralClient(small) as limited,
        pytest.raises(RequestTooLarge, match="the prompt is 14 KiB, over the limit of 4 KiB"),
    ):
        limited.submit(make_spec(secret_text))
    # Nothing was queued or logged for either attempt: no new key (kombu's restore mutex aside).
    assert {k for k in set(r.keys()) - keys_before if not k.startswith(b"unacked")} == set()
