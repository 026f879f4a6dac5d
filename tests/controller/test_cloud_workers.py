"""``corral worker --cloud``: cloud routes served by any worker that holds the provider's key.

Real redis-server, real worker processes and the real CLI; the provider is the fake Anthropic
Messages API (``anthropic+http://127.0.0.1:PORT`` routes). A ``--cloud`` worker has no
backend configured for the route: it advertises the providers it has keys for and builds the
adapter when the route's first job comes. A recognisable key is planted in its environment
and must reach the provider and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from broker.schemas import DoneEvent
from broker.settings import build_settings
from controller.cli import ExitCode
from controller.client import CorralClient, make_spec
from tests.controller.test_flower import shows_up, start_flower
from tests.fakes.fake_anthropic import running_fake_anthropic
from tests.support.cli import corral
from tests.support.secret_scan import RedisMonitor, encodings_of, everything_in_redis
from tests.support.servers import REPO_ROOT, WorkerProcess, start_worker

PLANTED_KEY = "sk-ant-cloudflag-PLANTED-5e0d"
MODEL = "claude-cloud-haiku"
REPLY = "Any worker with the key can serve me."


def cloud_worker(broker_url: str, name: str, log_dir: Path) -> WorkerProcess:
    return start_worker(
        broker_url,
        name,
        "--cloud",
        "--loglevel",
        "DEBUG",  # every HTTP exchange is logged: the key must not be in any of it
        log_dir=log_dir,
        env={"ANTHROPIC_API_KEY": PLANTED_KEY},
    )


def events_of(answer: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in answer.stdout.splitlines() if line.strip()]


def test_a_cloud_route_runs_on_the_cloud_worker_and_its_key_stays_there(
    broker_url: str, tmp_path: Path
) -> None:
    monitor = RedisMonitor(broker_url)  # from before any worker starts
    workers: list[WorkerProcess] = []
    with running_fake_anthropic(api_key=PLANTED_KEY, models=[MODEL], reply=REPLY) as fake:
        try:
            # A worker without --cloud (and without the key) that could take any other job.
            workers.append(start_worker(broker_url, "pi", "--simulate", log_dir=tmp_path))
            edge = cloud_worker(broker_url, "edge", tmp_path)
            workers.append(edge)
            where = fake.url.removeprefix("http://")
            added = corral(broker_url, "route", "add", "claude", f"anthropic+http://{where}", MODEL)
            assert added.returncode == ExitCode.OK, added.stderr

            nodes = corral(broker_url, "nodes")
            assert nodes.returncode == ExitCode.OK, nodes.stderr
            edge_row = next(line for line in nodes.stdout.splitlines() if "edge" in line)
            assert "--cloud" in edge_row and "routes of anthropic" in edge_row
            listing = corral(broker_url, "route", "list")
            row = next(line for line in listing.stdout.splitlines() if "@claude" in line)
            assert row.startswith("✓") and "served by edge/cloud-anthropic (--cloud)" in row
            caps = corral(broker_url, "route", "caps", "claude")
            assert "served by edge/cloud-anthropic (--cloud) (up)" in caps.stdout
            assert "key       ANTHROPIC_API_KEY" in caps.stdout

            answers = [
                corral(broker_url, "ask", "--json", "@claude where do you run?") for _ in range(3)
            ]
            for answer in answers:
                assert answer.returncode == ExitCode.OK, answer.stderr
                events = events_of(answer)
                started = [e for e in events if e["type"] == "started"]
                assert [(e["node"], e["backend"], e["model"]) for e in started] == [
                    ("edge", "cloud-anthropic", MODEL)
                ]
                assert events[-1]["type"] == "done"
                assert events[-1]["result"]["text"] == REPLY  # type: ignore[index]
            assert fake.state.headers_seen[-1]["x-api-key"] == PLANTED_KEY  # it did travel
            # The adapter is built for the route, not a catalogue: the model list is not asked.
            assert fake.state.model_listings == 0

            edge.stop()  # the only worker able to serve the route is gone
            nobody = corral(broker_url, "ask", "@claude still there?")
            assert nobody.returncode == ExitCode.NO_ROUTE, nobody.stderr
            said = " ".join(nobody.stderr.split())
            assert "ANTHROPIC_API_KEY" in said and "corral worker --cloud" in said
        finally:
            for worker in workers:
                worker.stop()
    commands = monitor.stop()
    # Flower and the worker log show the route's name in the task's argsrepr, not its URL.
    assert "route=claude node=edge" in commands
    outputs = {
        "worker logs": "".join(w.log() for w in workers),
        "redis now": everything_in_redis(broker_url),
        "redis commands": commands,
        "cli": "".join(
            r.stdout + r.stderr for r in (added, nodes, listing, caps, *answers, nobody)
        ),
    }
    for where_found, text in outputs.items():
        for form in encodings_of(PLANTED_KEY):
            assert form not in text, f"the key leaked into the {where_found}"


def test_a_cloud_worker_killed_before_the_first_token_hands_the_job_to_another(
    broker_url: str, tmp_path: Path
) -> None:
    with running_fake_anthropic(
        api_key=PLANTED_KEY, models=[MODEL], reply=REPLY, first_token_delay=5.0
    ) as fake:
        workers = [cloud_worker(broker_url, name, tmp_path) for name in ("edge1", "edge2")]
        workers.append(start_worker(broker_url, "pi", "--simulate", log_dir=tmp_path))
        by_name = {w.name: w for w in workers}
        try:
            where = fake.url.removeprefix("http://")
            added = corral(broker_url, "route", "add", "claude", f"anthropic+http://{where}", MODEL)
            assert added.returncode == ExitCode.OK, added.stderr
            env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
            env.pop("CORRAL_CONFIG", None)
            ask = subprocess.Popen(
                [sys.executable, "-m", "controller", "ask", "--json", "@claude hello"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, "CORRAL_BROKER_URL": broker_url},
                cwd=REPO_ROOT,
            )
            assert ask.stdout is not None
            first = json.loads(ask.stdout.readline())
            while first["type"] != "started":
                first = json.loads(ask.stdout.readline())
            # The provider has the request and has not answered yet: the worker dies.
            assert fake.wait_until(lambda s: s.streams_started >= 1, timeout=10)
            by_name[first["node"]].stop(signal.SIGKILL)
            out, err = ask.communicate(timeout=60)
        finally:
            for worker in workers:
                worker.stop()
    assert ask.returncode == ExitCode.OK, err
    events = [first, *(json.loads(line) for line in out.splitlines() if line.strip())]
    started = [e["node"] for e in events if e["type"] == "started"]
    other = "edge2" if first["node"] == "edge1" else "edge1"
    assert started == [first["node"], other]  # moved to the other --cloud worker, not to pi
    assert any(e["type"] == "rerouted" for e in events)
    assert events[-1]["type"] == "done" and events[-1]["result"]["text"] == REPLY
    assert PLANTED_KEY not in out + err


def test_flower_shows_a_cloud_job_and_never_the_key(broker_url: str, tmp_path: Path) -> None:
    """The key-leak scan's Flower part: every page and API answer about the worker and its
    cloud jobs, once Flower has seen one."""
    with running_fake_anthropic(api_key=PLANTED_KEY, models=[MODEL], reply=REPLY) as fake:
        edge = cloud_worker(broker_url, "edge", tmp_path)
        flower = start_flower(broker_url, tmp_path)
        try:
            where = fake.url.removeprefix("http://")
            added = corral(broker_url, "route", "add", "claude", f"anthropic+http://{where}", MODEL)
            assert added.returncode == ExitCode.OK, added.stderr
            settings = build_settings(broker_url=broker_url)
            with CorralClient(settings) as client:
                # Flower turns task events on by broadcast every few seconds: ask until it
                # has seen one of the route's jobs.
                deadline = time.monotonic() + 30
                while True:
                    spec = make_spec(
                        "where do you run?",
                        route="claude",
                        route_url=f"anthropic+http://{where}",
                        model=MODEL,
                    )
                    events = list(client.stream(spec))
                    assert isinstance(events[-1], DoneEvent), events[-1]
                    if shows_up(flower, spec.job_id, within_s=1):
                        break
                    assert time.monotonic() < deadline, "flower never saw a cloud job"
            pages = [
                flower.get(path)[1]
                for path in (
                    f"/api/task/info/{spec.job_id}",
                    "/api/tasks",
                    "/api/workers",
                    "/tasks",
                    "/workers",
                    f"/task/{spec.job_id}",
                    f"/worker/{edge.name}@{socket.gethostname()}",
                )
            ]
        finally:
            flower.stop()
            edge.stop()
    shown = "\n".join(pages)
    assert spec.job_id in shown and "route=claude" in shown  # Flower did show the job
    for form in encodings_of(PLANTED_KEY):
        assert form not in shown + flower.log(), "the key leaked into Flower"
