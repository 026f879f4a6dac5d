"""``corral tunnel`` as a node runs it: its own process, an asyncssh server on loopback that the
test starts (and restarts), a real worker whose broker URL is the tunnel's local port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import asyncssh
import pytest
import redis

from broker.schemas import DeltaEvent, DoneEvent, ReroutedEvent
from broker.settings import build_settings
from controller.cli import ExitCode
from controller.client import CorralClient, make_spec
from controller.health import Status, check_tunnels
from controller.localcluster import stop_process
from controller.tunnel import backoff_delay, parse_via, read_tunnel_states
from tests.support.servers import (
    REPO_ROOT,
    RedisServer,
    WorkerProcess,
    free_port,
    start_worker,
    wait_until,
)
from tests.support.ssh_server import SSHServer
from worker.backends.simulated import reply_for

HEARTBEAT_S = 2.0
"""corral's default: a node is down after 3 missed heartbeats (6 s)."""


@dataclass
class TunnelProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    state_file: Path
    _log_file: BinaryIO | None = field(default=None, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict[str, object]:
        try:
            state: dict[str, object] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state

    def wait_up(self, timeout_s: float = 15) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"corral tunnel exited:\n{self.log()}")
            return self.state().get("state") == "up"

        wait_until(up, timeout_s, "the tunnel to be up")

    def stop(self) -> int:
        code = stop_process(self.process, timeout_s=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code


def corral_tunnel_command(server: SSHServer, *args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", "tunnel", "--via", server.via, *args]


def tunnel_env(workdir: Path) -> dict[str, str]:
    env = {**os.environ, "CORRAL_STATE_DIR": str(workdir / "state")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def start_tunnel(server: SSHServer, workdir: Path, *args: str) -> TunnelProcess:
    log_path = workdir / f"tunnel-{time.monotonic_ns()}.log"
    state_file = workdir / "tunnel-state.json"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in TunnelProcess.stop
    process = subprocess.Popen(
        corral_tunnel_command(server, "--state-file", str(state_file), *args),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=tunnel_env(workdir),
        cwd=workdir,
    )
    return TunnelProcess(process, log_path, state_file, log_file)


def run_tunnel_to_exit(
    server: SSHServer, workdir: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        corral_tunnel_command(server, "--local-port", str(free_port()), *args),
        capture_output=True,
        text=True,
        timeout=30,
        env=tunnel_env(workdir),
        cwd=workdir,
    )


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def ssh_server(tmp_path: Path) -> Iterator[SSHServer]:
    server = SSHServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_worker_behind_the_tunnel_serves_jobs_and_rides_out_a_server_restart(
    ssh_server: SSHServer, redis_server: RedisServer, broker_url: str, tmp_path: Path
) -> None:
    local_port, reverse_port = free_port(), free_port()
    db = broker_url.rsplit("/", 1)[1]
    tunnel = start_tunnel(
        ssh_server,
        tmp_path,
        "--known-hosts", str(ssh_server.write_known_hosts()),
        "--identity", str(ssh_server.write_identity()),
        "--local-port", str(local_port),
        "--remote", f"127.0.0.1:{redis_server.port}",
        # The SSH host's port leads back to something on the node (here: the same Redis).
        "--reverse", f"{reverse_port}:127.0.0.1:{redis_server.port}",
    )  # fmt: skip
    worker: WorkerProcess | None = None
    try:
        tunnel.wait_up()
        assert redis.Redis(port=reverse_port).ping()
        [doctor_line] = check_tunnels(read_tunnel_states(tmp_path))
        assert doctor_line.status is Status.OK, doctor_line
        assert f"127.0.0.1:{local_port} here → 127.0.0.1:{redis_server.port}" in doctor_line.detail
        assert f"127.0.0.1:{reverse_port} on 127.0.0.1 → 127.0.0.1:" in doctor_line.detail

        # A real worker whose only way to the broker is the tunnel.
        worker = start_worker(
            f"redis://127.0.0.1:{local_port}/{db}",
            "edge",
            "--simulate", "--sim-first-token-ms", "5", "--sim-token-ms", "100",
            heartbeat_s=HEARTBEAT_S,
            log_dir=tmp_path,
        )  # fmt: skip
        with CorralClient(build_settings(broker_url=broker_url)) as client:
            wait_until(lambda: any(n.up for n in client.nodes()), 10, "node edge up")
            first = list(client.stream(make_spec("through the tunnel", node="edge")))
            assert isinstance(first[-1], DoneEvent), first[-1]
            assert first[-1].result.node == "edge"

            # A long job: the SSH server restarts after its first token.
            spec = make_spec("a job that outlives the link")
            events = []
            restarted_at = 0.0
            for event in client.submit(spec).events(60):
                events.append(event)
                if isinstance(event, DeltaEvent) and not restarted_at:
                    ssh_server.restart()
                    restarted_at = time.monotonic()
            wait_until(lambda: tunnel.state().get("state") == "up", 15, "the tunnel back up")
            assert not any(isinstance(e, ReroutedEvent) for e in events), events
            assert isinstance(events[-1], DoneEvent), events[-1]
            assert events[-1].result.node == "edge"
            assert events[-1].result.text == reply_for(spec.messages)  # every token, once

            # The next job is served through the new connection.
            after = list(client.stream(make_spec("after the restart", node="edge")))
            assert isinstance(after[-1], DoneEvent), after[-1]

            # A job sent while the SSH server is away waits in the node's queue and is
            # served when the tunnel is back, within the heartbeat bound: nothing is lost.
            ssh_server.stop_listening()
            wait_until(lambda: tunnel.state().get("state") != "up", 5, "the tunnel to notice")
            queued = make_spec("sent while the tunnel is down", node="edge")
            run = client.submit(queued)
            time.sleep(1.0)
            ssh_server.start()
            back_at = time.monotonic()
            events = list(run.events(60))
            served_after_s = time.monotonic() - back_at
            assert not any(isinstance(e, ReroutedEvent) for e in events), events
            assert isinstance(events[-1], DoneEvent), events[-1]
            assert events[-1].result.text == reply_for(queued.messages)
            # Within the heartbeat bound (3 heartbeats), plus the job's own ~2.5 s of tokens.
            assert served_after_s < 3 * HEARTBEAT_S + 2.5, served_after_s
            print(f"queued job served {served_after_s:.2f} s after the SSH server returned")

        log = tunnel.log()
        assert "down" in log and "retrying in" in log, log
        assert int(str(tunnel.state()["reconnects"])) >= 1
        assert redis.Redis(port=reverse_port).ping()  # the reverse forward came back too
    finally:
        if worker is not None:
            worker.stop()
        assert tunnel.stop() == 0
    assert tunnel.state()["state"] == "stopped"
    [doctor_line] = check_tunnels(read_tunnel_states(tmp_path))
    assert doctor_line.status is Status.FAIL and "not running: stopped" in doctor_line.detail
    assert f"delete {tunnel.state_file}" in str(doctor_line.fix)


def test_a_wrong_host_key_is_refused_naming_the_host_and_the_fingerprint(
    ssh_server: SSHServer, tmp_path: Path
) -> None:
    impostor_trusted = asyncssh.generate_private_key("ssh-ed25519")
    result = run_tunnel_to_exit(
        ssh_server,
        tmp_path,
        "--known-hosts", str(ssh_server.write_known_hosts(impostor_trusted)),
        "--identity", str(ssh_server.write_identity()),
    )  # fmt: skip
    out = flat(result.stderr)
    assert result.returncode == ExitCode.USAGE, out
    assert "host key refused: 127.0.0.1 (port" in out
    assert ssh_server.fingerprint in out
    assert "Traceback" not in out
    # `corral doctor` on this node says the same.
    [doctor_line] = check_tunnels(read_tunnel_states(tmp_path / "state" / "tunnels"))
    assert doctor_line.status is Status.FAIL
    assert "gave up" in doctor_line.detail and ssh_server.fingerprint in doctor_line.detail


def test_a_host_missing_from_known_hosts_is_refused_too(
    ssh_server: SSHServer, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts-empty"
    empty.write_text("")
    result = run_tunnel_to_exit(
        ssh_server,
        tmp_path,
        "--known-hosts",
        str(empty),
        "--identity",
        str(ssh_server.write_identity()),
    )
    assert result.returncode == ExitCode.USAGE
    assert ssh_server.fingerprint in flat(result.stderr)


@pytest.mark.parametrize(
    ("key_file", "expected"),
    [
        ("missing", "identity file {path} does not exist"),
        ("public", "is not a private key corral can read"),
        ("unauthorized", "refused the key in {path}"),
    ],
)
def test_a_wrong_key_file_is_a_clear_error(
    ssh_server: SSHServer, tmp_path: Path, key_file: str, expected: str
) -> None:
    path = tmp_path / f"key-{key_file}"
    if key_file == "public":
        path.write_bytes(ssh_server.client_key.export_public_key())
    elif key_file == "unauthorized":
        path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    result = run_tunnel_to_exit(
        ssh_server,
        tmp_path,
        "--known-hosts", str(ssh_server.write_known_hosts()),
        "--identity", str(path),
    )  # fmt: skip
    out = flat(result.stderr)
    assert result.returncode == ExitCode.USAGE, out
    assert expected.format(path=path) in out
    assert "Traceback" not in out


def test_bad_flags_and_the_backoff() -> None:
    assert parse_via("me@gw.lan:2222") == ("me", "gw.lan", 2222)
    assert parse_via("gw.lan") == (None, "gw.lan", 22)
    assert parse_via("me@[::1]:22") == ("me", "::1", 22)
    # Exponential, jittered within the upper half, capped.
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (20, 30.0)]:
        delays = {backoff_delay(attempt, 0.5, 30.0) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1


def test_a_missing_known_hosts_file_is_a_clear_error(ssh_server: SSHServer, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-known_hosts"
    result = run_tunnel_to_exit(
        ssh_server,
        tmp_path,
        "--known-hosts",
        str(missing),
        "--identity",
        str(ssh_server.write_identity()),
    )
    assert result.returncode == ExitCode.USAGE
    assert f"known_hosts file {missing} does not exist" in flat(result.stderr)


def test_a_silent_link_is_noticed_by_keepalives_and_the_tunnel_comes_back(
    ssh_server: SSHServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    local_port = free_port()
    tunnel = start_tunnel(
        ssh_server,
        tmp_path,
        "--known-hosts", str(ssh_server.write_known_hosts()),
        "--identity", str(ssh_server.write_identity()),
        "--local-port", str(local_port),
        "--remote", f"127.0.0.1:{redis_server.port}",
    )  # fmt: skip
    try:
        tunnel.wait_up()
        assert redis.Redis(port=local_port).ping()
        frozen_at = time.monotonic()
        ssh_server.freeze(9)  # no FIN, no RST: only the keepalives can tell
        wait_until(lambda: tunnel.state().get("state") != "up", 12, "the tunnel to notice")
        noticed_after_s = time.monotonic() - frozen_at
        assert noticed_after_s < 9, noticed_after_s
        assert "keepalive" in str(tunnel.state().get("reason", "")).lower(), tunnel.state()
        tunnel.wait_up(timeout_s=20)
        assert redis.Redis(port=local_port, socket_timeout=5).ping()
        print(f"silent link noticed after {noticed_after_s:.1f} s")
    finally:
        assert tunnel.stop() == 0
