"""The corral_broker role's Sentinel options, as the real redis-server reads them: its
redis.conf for a replica and its sentinel.conf, rendered from the role's templates (Jinja, as
Ansible renders them) and started on free loopback ports."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import jinja2
import redis

from controller.localcluster import free_port, stop_process
from tests.support.servers import REPO_ROOT, start_redis, wait_until

TEMPLATES = REPO_ROOT / "ansible" / "roles" / "corral_broker" / "templates"
PASSWORD = "role-sentinel-pw-0123456789"


def render(template: str, **variables: object) -> str:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters["comment"] = lambda text: f"# {text}"
    return environment.get_template(template).render(ansible_managed="managed", **variables)


def start(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", str(config), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_a_replica_and_a_sentinel_from_the_role_follow_the_primary(tmp_path: Path) -> None:
    primary = start_redis(password=PASSWORD)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        common = {
            "corral_broker_bind": ["127.0.0.1"],
            "corral_broker_password": PASSWORD,
            "corral_broker_logfile": "",
            "corral_broker_maxmemory": "64mb",
            "corral_broker__acl": False,
        }
        replica_port = free_port()
        replica_conf = tmp_path / "redis.conf"
        replica_conf.write_text(
            render(
                "redis.conf.j2",
                **common,
                corral_broker_port=replica_port,
                corral_broker_data_dir=str(tmp_path),
                corral_broker_replica_of=f"127.0.0.1 {primary.port}",
            )
        )
        processes.append(start(replica_conf))
        replica = redis.Redis(port=replica_port, password=PASSWORD, decode_responses=True)
        wait_until(
            lambda: replica.info("replication").get("master_link_status") == "up",
            15,
            "the replica to sync with the password",
        )

        sentinel_port = free_port()
        sentinel_conf = tmp_path / "sentinel.conf"
        sentinel_conf.write_text(
            render(
                "sentinel.conf.j2",
                **common,
                corral_broker_sentinel_port=sentinel_port,
                corral_broker_sentinel_master_name="corral",
                corral_broker_sentinel_primary=f"127.0.0.1 {primary.port}",
                corral_broker_sentinel_quorum=1,
                corral_broker_sentinel_down_after_ms=1000,
            )
        )
        processes.append(start(sentinel_conf, "--sentinel"))
        sentinel = redis.Redis(port=sentinel_port, decode_responses=True)
        wait_until(lambda: _answers(sentinel), 10, "the sentinel to answer")
        assert sentinel.sentinel_get_master_addr_by_name("corral") == ("127.0.0.1", primary.port)
        time.sleep(1.5)  # past down-after: a primary the sentinel cannot AUTH to is s_down now
        state = sentinel.sentinel_master("corral")
        assert state["is_master"] and not state["is_sdown"], state
        wait_until(
            lambda: int(sentinel.sentinel_master("corral")["num-slaves"]) == 1, 15, "replica found"
        )
        replica.close()
        sentinel.close()
    finally:
        for process in processes:
            stop_process(process, timeout_s=10)
        primary.stop()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False
