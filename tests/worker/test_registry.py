"""Every backend kind has an adapter, and a worker's flags build the right specs."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import get_args

import httpx
import pytest
from click.testing import CliRunner

from broker.errors import ConfigError
from broker.schemas import BackendKind
from tests.support.servers import REPO_ROOT
from worker.__main__ import worker_command
from worker.backends.registry import (
    ADAPTER_MODULES,
    FACTORIES,
    build_backends,
    make_http_client,
    needs_tls,
)
from worker.config import BackendSpec, backend_spec, build_worker_config


def test_every_kind_has_a_factory() -> None:
    assert set(FACTORIES) == set(get_args(BackendKind))
    assert set(ADAPTER_MODULES) == set(FACTORIES)


@pytest.mark.parametrize("kind", ["anthropic", "google", "openai-cloud", "mistral", "deepseek"])
def test_a_provider_without_its_key_stops_the_worker_naming_the_variable(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in (
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "OPENAI_API_KEY",
        "MISTRAL_API_KEY",
        "DEEPSEEK_API_KEY",
    ):
        monkeypatch.delenv(variable, raising=False)
    config = build_worker_config(None, name="n", backends=(backend_spec(kind=kind),))
    with pytest.raises(ConfigError, match="API_KEY"):
        build_backends(config, httpx.AsyncClient())


def test_provider_backends_are_built_with_their_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "ds-test")
    config = build_worker_config(
        None,
        name="n",
        backends=(backend_spec(kind="anthropic"), backend_spec(kind="deepseek")),
    )
    backends = build_backends(config, httpx.AsyncClient())
    assert {name: b.kind for name, b in backends.items()} == {
        "anthropic": "anthropic",
        "deepseek": "deepseek",
    }
    assert backends["anthropic"].url == "https://api.anthropic.com"
    assert backends["deepseek"].url == "https://api.deepseek.com"


def test_a_missing_key_is_a_clear_cli_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no corral.yaml here
    result = CliRunner().invoke(
        worker_command, ["--name", "n", "--anthropic", "--broker", "redis://127.0.0.1:9/0"]
    )
    assert result.exit_code == 2
    assert "set ANTHROPIC_API_KEY" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ((backend_spec(kind="ollama", url="http://127.0.0.1:11434"),), False),
        ((backend_spec(kind="simulated"), backend_spec(kind="openai", url="http://a:8080")), False),
        ((backend_spec(kind="ollama", url="https://gpu.lan:11434"),), True),
        ((backend_spec(kind="ollama", url="http://a:1"), backend_spec(kind="anthropic")), True),
        ((backend_spec(kind="openai-cloud", url="http://127.0.0.1:9000/v1"),), False),
    ],
)
def test_a_node_loads_tls_trust_only_when_a_backend_is_https(
    specs: tuple[BackendSpec, ...], expected: bool
) -> None:
    assert needs_tls(build_worker_config(None, name="n", backends=specs)) is expected


def test_a_plain_http_node_refuses_https_rather_than_skip_verification(tmp_path: Path) -> None:
    """Without TLS trust loaded, an HTTPS request fails on the certificate; it is never sent
    unverified."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handshakes: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshakes.append("completed")
        writer.close()

    async def request() -> None:
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            async with make_http_client(5.0, tls=False) as client:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.get(f"https://127.0.0.1:{port}/api/tags")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(request())
    assert handshakes == []  # no handshake completed, so no request was sent


def test_a_worker_process_does_not_import_what_it_never_runs() -> None:
    probe = (
        "import sys, worker, celery.apps.worker\n"
        # The shipped tables are JSON: pricing a job and filling a heartbeat need no YAML.
        "from broker.catalog import shipped_catalog\n"
        "from broker.schemas import ModelInfo\n"
        "assert shipped_catalog().price('anthropic', 'claude-opus-4-1') is not None\n"
        "assert shipped_catalog().fill('ollama', ModelInfo(name='qwen3:8b')).context_length\n"
        "never = ('httpx._main', 'rich', 'yaml', 'psutil', 'opentelemetry.sdk.metrics',\n"
        "         'opentelemetry.metrics', 'hiredis')\n"
        "print(sorted(m for m in never if sys.modules.get(m)))\n"
        # redis-py parses with its Python parser, hiredis being held back.
        "import redis.utils\n"
        "assert not redis.utils.HIREDIS_AVAILABLE\n"
        # Loaded on first use: a model operation, a job's end, a cloud adapter's headers.
        "later = ('worker.model_ops', 'worker.usage', 'worker.provider_limits',\n"
        "         'worker.backends.simulated')\n"
        "print(sorted(m for m in later if m in sys.modules))\n"
        "import yaml, psutil\n"  # still there for corral's own use
        "print(yaml.safe_load('a: 1'), psutil.virtual_memory().total > 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout.splitlines()
    assert out == ["[]", "[]", "{'a': 1} True"]


@pytest.mark.parametrize(
    ("flags", "http_stack_loaded"),
    [
        ("--ollama http://127.0.0.1:9 --simulate", True),
        ("--openai-compat http://127.0.0.1:9/v1", True),
        ("--anthropic --google --deepseek", True),
        ("--simulate", False),
    ],
)
def test_adapters_are_imported_before_the_loop_starts(flags: str, http_stack_loaded: bool) -> None:
    """What a node's backends import is imported by ``import_adapters`` (on the main thread,
    before the loop's thread exists): building them and using httpx afterwards imports no
    adapter module and none of httpx's transport."""
    probe = (
        "import sys, asyncio\n"
        "from click.testing import CliRunner\n"
        "from worker.backends.registry import build_backends, import_adapters\n"
        "from worker.config import build_worker_config, backend_spec\n"
        "from worker.__main__ import worker_command\n"
        "import worker.__main__ as main\n"
        "seen = {}\n"
        "main.serve = lambda settings, config, **kw: seen.setdefault('config', config) and 0\n"
        "CliRunner().invoke(worker_command,"
        f" '--name n --broker redis://127.0.0.1:9/0 {flags}'.split(), catch_exceptions=False)\n"
        "config = seen['config']\n"
        "import_adapters(config)\n"
        "before = set(sys.modules)\n"
        "import httpx\n"
        "build_backends(config, httpx.AsyncClient())\n"
        "async def first_request():\n"
        "    async with httpx.AsyncClient() as client:\n"
        "        try: await client.get('http://127.0.0.1:9/')\n"
        "        except httpx.ConnectError: pass\n"
        # A node with an HTTP backend makes requests from its first heartbeat on.
        f"if {http_stack_loaded}: asyncio.run(first_request())\n"
        "print(sorted(m for m in set(sys.modules) - before"
        " if m.startswith(('worker.', 'httpcore', 'h11', 'anyio'))))\n"
        "print('anyio._backends._asyncio' in before)\n"
    )
    env = {
        **os.environ,
        "ANTHROPIC_API_KEY": "k",
        "GEMINI_API_KEY": "k",
        "DEEPSEEK_API_KEY": "k",
    }
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env=env,
    ).stdout.splitlines()
    assert out[-2:] == ["[]", str(http_stack_loaded)]


def test_a_worker_process_lets_go_of_the_build_variables_zoneinfo_read() -> None:
    probe = (
        # pydantic imports zoneinfo, which reads TZPATH through sysconfig.
        "import sys, worker.__main__, celery.apps.worker\n"
        "print(sorted(m for m in sys.modules if m.startswith('_sysconfigdata')))\n"
        # Still there for whoever asks, and the time zones found where the build says.
        "import sysconfig, zoneinfo\n"
        "print(tuple(sysconfig.get_config_var('TZPATH').split(':')) == zoneinfo.TZPATH)\n"
        "print(zoneinfo.ZoneInfo('Europe/Paris'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout.splitlines()
    assert out == ["[]", "True", "Europe/Paris"]
