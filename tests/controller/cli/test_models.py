"""`corral models`, its lifecycle commands, `ask --fanout/--models` and `corral nodes`, run as
a user runs them: the CLI in its own process against real worker processes.

One cluster for the module: ``alpha`` and ``beta`` front the simulated backend, ``pi1`` fronts
a fake Ollama (whose replies differ from the simulated ones, so side-by-side answers can be
told apart). Each test touches models the others leave alone, so their order does not matter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from broker.schemas import ChatMessage
from broker.settings import build_settings
from controller.cli import ExitCode
from controller.client import CorralClient
from tests.fakes.fake_ollama import DEFAULT_REPLY, FakeModel, FakeOllama, running_fake_ollama
from tests.support.servers import REPO_ROOT, start_worker, wait_until
from worker.backends.simulated import reply_for

FAST = ["--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "1"]
TOO_BIG = FakeModel("giant:405b", size=10**15, parameter_size="405B")
"""A petabyte on disk: no test machine has the memory to load it."""
PI1_MODELS = (
    FakeModel("llama3.2:1b"),  # loaded from the start
    FakeModel("qwen2.5:0.5b", size=397_821_319, parameter_size="494.03M"),
    FakeModel("phi3:mini", size=2_176_178_913, parameter_size="3.8B"),  # warmed, unloaded
    FakeModel("old:1b"),  # removed
    TOO_BIG,
)
REGISTRY = (FakeModel("mistral:7b", size=4_113_301_824, parameter_size="7.2B"),)


def corral(
    broker_url: str, *args: str, columns: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``corral ARGS`` in its own process, its output piped as a script would read it."""
    env = {**os.environ, "CORRAL_BROKER_URL": broker_url}
    env.pop("CORRAL_CONFIG", None)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )


def flat(text: str) -> str:
    """Whitespace folded: rich wraps stderr at 80 columns when it is not a terminal."""
    return " ".join(text.split())


def fleet(broker_url: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``corral models --json`` by (node, model)."""
    result = corral(broker_url, "models", "--json")
    assert result.returncode == ExitCode.OK, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {(row["node"], row["name"]): row for row in rows}


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of a borderless rich table (columns are at least two spaces apart)."""
    lines = stdout.splitlines()
    body = next(i for i, line in enumerate(lines) if line.strip().startswith("─")) + 1
    return [re.split(r"\s{2,}", line.strip()) for line in lines[body:] if line.strip()]


def side_by_side(stdout: str) -> dict[str, dict[str, str]]:
    """The answers table read back: column header -> row label -> its text, unwrapped."""
    header = next(line for line in stdout.splitlines() if line.startswith("┃"))
    labels = [cell.strip() for cell in header.strip("┃").split("┃")][1:]
    columns: dict[str, dict[str, str]] = {label: {} for label in labels}
    row = ""
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        first, *rest = (cell.strip() for cell in line.strip("│").split("│"))
        row = first or row
        for label, cell in zip(labels, rest, strict=True):
            columns[label][row] = flat(f"{columns[label].get(row, '')} {cell}")
    return columns


def clock(at: float) -> set[str]:
    """How ``at`` shows as a time of day, allowing for the minute turning meanwhile."""
    return {datetime.fromtimestamp(at + d).strftime("%H:%M") for d in (-60, 0, 60)}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with running_fake_ollama(
        PI1_MODELS, loaded=("llama3.2:1b",), registry=REGISTRY, pull_delay=0.06
    ) as server:
        yield server


@pytest.fixture(scope="module")
def url(module_broker_url: str, module_log_dir: Path, fake: FakeOllama) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        for name, args in (
            ("alpha", [*FAST, "--tags", "sim,lab"]),
            ("beta", [*FAST, "--tags", "sim"]),
            ("pi1", ["--ollama", fake.url, "--tags", "lab"]),
        ):
            worker = start_worker(module_broker_url, name, *args, log_dir=module_log_dir)
            stack.callback(worker.stop)
        with CorralClient(build_settings(broker_url=module_broker_url)) as client:
            wait_until(lambda: sum(n.up for n in client.nodes()) == 3, 15, "three nodes up")
        yield module_broker_url


# --- corral models -------------------------------------------------------------------------


def test_models_lists_every_nodes_models_with_their_state_sorted_by_model(url: str) -> None:
    result = corral(url, "models", columns=200)
    assert result.returncode == ExitCode.OK, result.stderr
    rows = {(row[0], row[1]): row for row in table_rows(result.stdout) if len(row) == 9}
    # One model's copies sit together: sorted by model, then node.
    keys = list(rows)
    assert keys == sorted(keys)
    assert keys.index(("sim-small", "alpha")) + 1 == keys.index(("sim-small", "beta"))
    assert rows[("sim-small", "alpha")] == [
        "sim-small",
        "alpha",
        "simulated",
        "1.3 GB",
        "1B",
        "Q4_K_M",
        "8k",
        "chat,tools",
        "loaded (kept)",
    ]
    assert rows[("sim-large", "beta")][-1] == "installed"
    llama = rows[("llama3.2:1b", "pi1")]
    assert llama[2:8] == ["ollama", "1.3 GB", "1.2B", "Q8_0", "128k", "chat,tools"]
    # Ollama keeps a model it loaded on its own for five minutes.
    assert llama[-1] in {f"loaded until {t}" for t in clock(time.time() + 300)}
    assert rows[("qwen2.5:0.5b", "pi1")][3] == "398 MB"
    assert rows[("qwen2.5:0.5b", "pi1")][-1] == "installed"


def test_models_json_has_one_object_per_node_backend_and_model(url: str) -> None:
    models = fleet(url)
    assert {node for node, _ in models} == {"alpha", "beta", "pi1"}
    small = models[("alpha", "sim-small")]
    assert small["node_up"] is True and small["backend_kind"] == "simulated"
    assert small["loaded"] is True and small["loaded_until"] is None
    assert models[("pi1", "giant:405b")]["size_bytes"] == 10**15
    listed = corral(url, "models", "list", "--json")
    assert [
        (row["node"], row["backend"], row["name"])
        for row in map(json.loads, listed.stdout.splitlines())
    ] == [(row["node"], row["backend"], row["name"]) for row in models.values()]


def test_the_table_fits_120_columns_when_piped(url: str) -> None:
    for command in (["models"], ["nodes"]):
        result = corral(url, *command)
        assert result.returncode == ExitCode.OK, result.stderr
        assert max(len(line) for line in result.stdout.splitlines()) <= 120, result.stdout


# --- pull / warm / unload / rm -------------------------------------------------------------


def test_pull_shows_each_layers_progress_then_the_model_is_listed(
    url: str, fake: FakeOllama
) -> None:
    result = corral(url, "models", "pull", "pi1", "mistral:7b")
    assert result.returncode == ExitCode.OK, result.stderr
    assert re.fullmatch(
        r"pulled mistral:7b \(4\.1 GB\) on pi1/ollama in \d+\.\d s\n", result.stdout
    )
    progress = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    assert progress[0] == "✓ pulling manifest"
    weights = fake.state.registry["mistral:7b"].layers()[0][0][:12]
    layer = next(line for line in progress if f"pulling {weights}" in line)
    assert layer.startswith("✓") and "4.1/4.1 GB" in layer
    assert progress[-1] == "✓ success"
    wait_until(lambda: ("pi1", "mistral:7b") in fleet(url), 5, "mistral:7b listed on pi1")


def test_ctrl_c_during_a_pull_stops_watching_and_the_node_finishes_it(url: str) -> None:
    env = {**os.environ, "CORRAL_BROKER_URL": url}
    process = subprocess.Popen(
        [sys.executable, "-m", "controller", "models", "pull", "alpha", "sim-vision", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        assert first["type"] == "progress" and first["status"] == "pulling manifest"
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == ExitCode.INTERRUPTED, err
    assert "the node runs it on its own, so it carries on" in flat(err)
    assert '"type": "done"' not in rest  # it stopped before the pull ended (it takes 1.5 s)
    wait_until(lambda: ("alpha", "sim-vision") in fleet(url), 10, "sim-vision on alpha")


def test_pull_of_a_model_the_registry_lacks_fails_with_the_backends_message(url: str) -> None:
    result = corral(url, "models", "pull", "beta", "nonesuch:1b")
    assert result.returncode == ExitCode.BACKEND, result.stderr
    message = flat(result.stderr)
    assert "pull of nonesuch:1b on beta failed" in message
    assert "not found in the simulated registry" in message
    assert result.stdout == ""


def test_pull_refuses_a_model_too_big_for_the_node_with_the_estimate(url: str) -> None:
    result = corral(url, "models", "pull", "beta", "sim-huge")
    assert result.returncode == ExitCode.MODEL_OP, result.stderr
    message = flat(result.stderr)
    assert "sim-huge would need about 47.5 GB of memory once loaded" in message
    assert "force the pull to go ahead anyway" in message
    assert ("beta", "sim-huge") not in fleet(url)


def test_warm_refuses_a_model_too_big_with_the_estimate_and_sends_nothing(
    url: str, fake: FakeOllama
) -> None:
    result = corral(url, "models", "warm", "pi1", "giant:405b")
    assert result.returncode == ExitCode.MODEL_OP, result.stderr
    message = flat(result.stderr)
    assert "giant:405b needs about 1200000.0 GB loaded (1000000.0 GB on disk x 1.2)" in message
    assert "--force to try anyway" in message
    loads = ("/api/generate", "/api/chat", "/api/embed")
    assert not [
        r for r in fake.state.requests if r.path in loads and r.body["model"] == "giant:405b"
    ]


def test_warm_loads_for_the_keep_alive_and_unload_frees_it(url: str, fake: FakeOllama) -> None:
    warmed = corral(url, "models", "warm", "pi1", "phi3:mini", "--keep-alive", "30m")
    assert warmed.returncode == ExitCode.OK, warmed.stderr
    assert warmed.stdout.startswith("loaded phi3:mini (kept for 30m) on pi1/ollama in ")
    assert "phi3:mini" in fake.state.loaded
    until = clock(time.time() + 1800)
    table = corral(url, "models", columns=200)
    phi = next(row for row in table_rows(table.stdout) if row[:2] == ["phi3:mini", "pi1"])
    assert phi[-1] in {f"loaded until {t}" for t in until}

    unloaded = corral(url, "models", "unload", "pi1", "phi3:mini")
    assert unloaded.returncode == ExitCode.OK, unloaded.stderr
    assert unloaded.stdout.startswith("unloaded phi3:mini on pi1/ollama in ")
    assert unloaded.stderr == ""  # nothing to show but the outcome
    assert "phi3:mini" not in fake.state.loaded
    assert fleet(url)[("pi1", "phi3:mini")]["loaded"] is False


def test_rm_deletes_the_model_and_an_unknown_one_is_named(url: str) -> None:
    removed = corral(url, "models", "rm", "pi1", "old:1b")
    assert removed.returncode == ExitCode.OK, removed.stderr
    assert removed.stdout.startswith("removed old:1b on pi1/ollama in ")
    assert ("pi1", "old:1b") not in fleet(url)

    again = corral(url, "models", "rm", "pi1", "old:1b")
    assert again.returncode == ExitCode.NO_ROUTE
    assert "model 'old:1b' is not on pi1/ollama (it has: " in flat(again.stderr)


def test_an_unknown_node_exits_3_and_the_help_documents_exit_7(url: str) -> None:
    result = corral(url, "models", "warm", "nowhere", "sim-small")
    assert result.returncode == ExitCode.NO_ROUTE
    assert "no node named 'nowhere' (known nodes: alpha, beta, pi1)" in flat(result.stderr)
    helped = corral(url, "models", "--help")
    assert "plus 7: the node refused or could not do the operation" in flat(helped.stdout)


# --- ask --fanout / --models ---------------------------------------------------------------


def test_fanout_prints_both_nodes_answers_side_by_side(url: str) -> None:
    prompt = "why is the sky blue"
    result = corral(url, "ask", "--fanout", "2", "--tag", "lab", prompt)
    assert result.returncode == ExitCode.OK, result.stderr
    columns = side_by_side(result.stdout)
    by_node = {column["node"]: column for column in columns.values()}
    assert set(by_node) == {"alpha", "pi1"}
    assert {label.split(". ", 1)[1] for label in columns} == {"alpha", "pi1"}
    simulated = reply_for([ChatMessage(role="user", content=prompt)])
    assert by_node["alpha"]["answer"] == flat(simulated)
    assert by_node["pi1"]["answer"] == flat(DEFAULT_REPLY)
    assert by_node["alpha"]["model"] == "sim-small"
    assert by_node["pi1"]["model"] == "llama3.2:1b"
    for column in by_node.values():
        assert column["state"] == "done"
        assert re.fullmatch(r"\d+ ms", column["first token"])
        assert re.fullmatch(r"\d+\.\d\d s", column["total"])
    assert by_node["pi1"]["tokens"] == str(len(DEFAULT_REPLY.split()))
    # Where each job went, for `corral attach`, on stderr.
    assert len(re.findall(r"\d\. (alpha|pi1): job [0-9a-f]{32}", result.stderr)) == 2


def test_models_runs_one_job_per_model_and_a_failed_one_shows_its_error(url: str) -> None:
    result = corral(url, "ask", "--models", "sim-small,nope:1b", "hello")
    assert result.returncode == ExitCode.NO_ROUTE, result.stderr  # 0 only if every job did
    columns = side_by_side(result.stdout)
    assert list(columns) == ["1. sim-small", "2. nope:1b"]
    assert columns["1. sim-small"]["state"] == "done"
    assert columns["1. sim-small"]["answer"] == flat(
        reply_for([ChatMessage(role="user", content="hello")])
    )
    assert columns["2. nope:1b"]["state"] == "failed"
    assert columns["2. nope:1b"]["answer"].startswith(
        "✗ failed: model 'nope:1b' is not installed on any node"
    )
    assert columns["2. nope:1b"]["node"] == "-"


def test_fanout_json_tags_every_event_with_its_job(url: str) -> None:
    result = corral(url, "ask", "--fanout", "2", "--tag", "sim", "--json", "hi")
    assert result.returncode == ExitCode.OK, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_job: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        by_job.setdefault(line["job_index"], []).append(line)
    assert set(by_job) == {1, 2}
    assert {events[0]["job_label"] for events in by_job.values()} == {"alpha", "beta"}
    for events in by_job.values():
        assert {e["job_label"] for e in events} == {events[0]["job_label"]}
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "started" and events[-1]["type"] == "done"
        assert events[0]["node"] == events[0]["job_label"]


def test_ctrl_c_cancels_the_jobs_still_running_and_shows_what_arrived(
    url: str, fake: FakeOllama
) -> None:
    env = {**os.environ, "CORRAL_BROKER_URL": url}
    aborted_before = fake.state.aborted_streams
    started_before = fake.state.streams_started
    fake.state.token_delay = 0.2  # pi1's answer takes seconds; alpha's is done at once
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "controller", "ask", "--fanout", "2", "--tag", "lab", "hi"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        try:
            wait_until(
                lambda: fake.state.streams_started > started_before, 15, "pi1 to start streaming"
            )
            time.sleep(0.5)  # a couple of tokens
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        fake.state.token_delay = 0.0
    assert process.returncode == ExitCode.INTERRUPTED, err
    assert "cancelled 1 of 2 jobs (the others had finished)" in flat(err)
    by_node = {column["node"]: column for column in side_by_side(out).values()}
    assert by_node["alpha"]["state"] == "done"
    assert by_node["pi1"]["state"] == "cancelled", err
    partial, _, why = by_node["pi1"]["answer"].partition(" ✗ ")
    assert partial and DEFAULT_REPLY.startswith(partial) and partial != DEFAULT_REPLY
    assert why.startswith("cancelled: job cancelled")
    assert fake.wait_until(lambda s: s.aborted_streams == aborted_before + 1, timeout=5)


def test_fanout_flags_that_contradict_each_other_are_a_usage_error(url: str) -> None:
    both = corral(url, "ask", "--fanout", "2", "--models", "a,b", "hi")
    assert both.returncode == ExitCode.USAGE
    assert "--fanout and --models do not go together" in flat(both.stderr)
    routed = corral(url, "ask", "--fanout", "2", "@alpha hi")
    assert routed.returncode == ExitCode.USAGE
    assert "--fanout picks the nodes itself" in flat(routed.stderr)


# --- corral nodes --------------------------------------------------------------------------


def test_nodes_shows_backend_load_machine_and_an_open_breaker(url: str, fake: FakeOllama) -> None:
    fake_url = fake.url
    with CorralClient(build_settings(broker_url=url)) as client:
        for _ in range(client.breakers.threshold):
            client.breakers.record_failure("beta/simulated")
        try:
            table = corral(url, "nodes")
            listed = corral(url, "nodes", "--json")
        finally:
            client.breakers.reset("beta/simulated")
    assert table.returncode == ExitCode.OK, table.stderr
    rows = table_rows(table.stdout)
    # A row per backend: jobs in flight of capacity, time to first token (once measured),
    # models (* loaded), and the machine's free/total RAM; its tags, the backend's URL and
    # the CPU load on the line below.
    pi1_at = rows.index(next(row for row in rows if row[0] == "pi1"))
    pi1, below = rows[pi1_at], rows[pi1_at + 1]
    assert pi1[1:3] == ["up", "ollama"]
    assert re.fullmatch(r"0/\d+", pi1[3]) and re.fullmatch(r"-|\d+ ms", pi1[4])
    assert "llama3.2:1b*" in pi1[5]
    assert re.fullmatch(r"RAM \d+\.\d/\d+\.\d", pi1[6])
    assert below[:2] == ["lab", fake_url] and re.fullmatch(r"CPU load \d+\.\d\d", below[-1])
    beta_at = rows.index(next(row for row in rows if row[0] == "beta"))
    assert rows[beta_at][1:4] == ["up", "simulated", "0/1"]
    assert re.fullmatch(r"breaker open \(\d+s\)", rows[beta_at + 1][1])
    assert re.search(
        r"beta/simulated: breaker open after 3 failures in a row; "
        r"one probe job may try it in \d+s",
        table.stdout,
    )
    nodes = {n["name"]: n for n in map(json.loads, listed.stdout.splitlines())}
    assert nodes["beta"]["breakers"] == {"beta/simulated": "open"}
    assert nodes["alpha"]["breakers"] == {}


def test_nodes_reset_breaker_closes_it_for_every_controller(url: str) -> None:
    with CorralClient(build_settings(broker_url=url)) as client:
        for _ in range(client.breakers.threshold):
            client.breakers.record_failure("beta/simulated")
        reset = corral(url, "nodes", "--reset-breaker", "beta/simulated")
        assert reset.returncode == ExitCode.OK, reset.stderr
        assert "breaker on beta/simulated closed" in reset.stderr
        assert "beta/simulated" not in client.cluster().breakers
        unknown = corral(url, "nodes", "--reset-breaker", "nowhere/ollama")
        assert unknown.returncode == ExitCode.USAGE
        assert "no circuit breaker on 'nowhere/ollama'" in unknown.stderr


def test_a_keep_alive_typo_is_a_usage_error_before_anything_is_sent(url: str) -> None:
    typo = corral(url, "models", "warm", "pi1", "phi3:mini", "--keep-alive", "30 minutes")
    assert typo.returncode == ExitCode.USAGE, typo.stderr
    assert "keep_alive '30 minutes' is not a duration" in flat(typo.stderr)
