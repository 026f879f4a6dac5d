"""site.yml, for real, on this machine: the roles lint at ansible-lint's production profile, the
playbook runs twice against a local inventory (the second run changes nothing), secrets land
only in mode-0600 environment files, and bad settings fail the play.

systemd, apt and user accounts are switched off by the test inventory (ansible/tests/); every
file lands under a temporary prefix. What the run rendered is started in test_site_services.py.
"""

from __future__ import annotations

import stat
import subprocess

import pytest

from broker.settings import build_settings
from tests.rollout.site_run import ANSIBLE_DIR, Rollout, broker_url, recap, tool
from tests.rollout.units import (
    parse_environment_file,
)

# The first run downloads corral's dependencies into the role's venv: slower on a cold pip cache.
pytestmark = [pytest.mark.ansible, pytest.mark.timeout(420)]


def test_the_roles_pass_ansible_lint_at_the_production_profile() -> None:
    run = subprocess.run(
        [tool("ansible-lint"), "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Profile 'production' was required, and it passed" in run.stdout + run.stderr


def test_site_yml_passes_the_syntax_check_with_the_example_inventory() -> None:
    run = subprocess.run(
        [tool("ansible-playbook"), "-i", "inventory.example.yml", "site.yml", "--syntax-check"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_site_yml_installs_and_a_second_run_changes_nothing(rollout: Rollout) -> None:
    first = rollout.first_run
    assert first.returncode == 0, first.stdout + first.stderr
    assert recap(first)["changed"] > 0
    second = rollout.playbook()
    assert second.returncode == 0, second.stdout + second.stderr
    assert recap(second)["changed"] == 0, second.stdout
    assert recap(second)["failed"] == 0


def test_secrets_stay_in_the_environment_files(rollout: Rollout) -> None:
    for env_file in (
        "etc/corral/worker.env",
        "etc/corral/flower.env",
        "etc/corral/tunnel_id",
    ):
        mode = stat.S_IMODE(rollout.path(env_file).stat().st_mode)
        assert mode == 0o600, f"{env_file} has mode {oct(mode)}"
    assert parse_environment_file(rollout.path("etc/corral/worker.env").read_text()) == {
        "REDIS_PASSWORD": rollout.password
    }
    for public in (
        "etc/corral/worker.yaml",
        "etc/corral/corral.yaml",
        "etc/systemd/system/corral-worker.service",
        "etc/systemd/system/corral-flower.service",
        "etc/systemd/system/corral-tunnel.service",
        "etc/redis/users.acl",
    ):
        text = rollout.path(public).read_text()
        assert rollout.password not in text, public
        assert rollout.worker_password not in text, public
        assert public.endswith(".acl") or text.startswith("#\n# Ansible managed"), public
    assert "${REDIS_PASSWORD}" in rollout.path("etc/corral/worker.yaml").read_text()
    # The playbook's own output never shows them either.
    output = rollout.first_run.stdout + rollout.first_run.stderr
    assert rollout.password not in output
    assert rollout.worker_password not in output


def test_the_controllers_corral_yaml_gives_corral_its_settings(
    rollout: Rollout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_CONFIG", str(rollout.path("etc/corral/corral.yaml")))
    monkeypatch.setenv("REDIS_PASSWORD", rollout.password)
    settings = build_settings()
    assert settings.broker_url.get_secret_value() == broker_url(rollout)
    assert settings.max_attempts == 2
    assert settings.aliases == {"coder": ("qwen2.5-coder:7b", "deepseek-coder:6.7b")}


def test_a_typo_in_a_role_variable_fails_the_play(rollout: Rollout) -> None:
    run = rollout.playbook("-e", '{"corral_broker_bnd": ["0.0.0.0"]}')
    assert run.returncode != 0
    assert "unknown variable(s) corral_broker_bnd" in run.stdout


@pytest.mark.parametrize(
    ("extra_vars", "complaint"),
    [
        ('{"corral_worker_secrets": {"VLLM_KEY": "has a space"}}', "values plain"),
        ('{"corral_worker_name": "gpu 1"}', "corral_worker_name must be"),
        ('{"corral_worker_backends": [{"kind": "olama", "url": "http://x"}]}', "olama"),
    ],
)
def test_bad_worker_settings_fail_before_anything_is_written(
    rollout: Rollout, extra_vars: str, complaint: str
) -> None:
    before = rollout.path("etc/corral/worker.yaml").read_text()
    run = rollout.playbook("--tags", "nodes", "-e", extra_vars)
    assert run.returncode != 0
    assert complaint in run.stdout, run.stdout
    assert rollout.path("etc/corral/worker.yaml").read_text() == before
