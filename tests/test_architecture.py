"""The dependency rule of DESIGN.md: controller -> broker <- worker, and nothing else."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "broker": {"worker", "controller"},
    "worker": {"controller"},
    "controller": {"worker"},
}


FRONT_DOORS = ("controller.cli", "controller.gateway", "controller.mcp")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def imported_top_level_packages(path: Path) -> set[str]:
    return {module.split(".")[0] for module in imported_modules(path)}


def front_door_of(module: str) -> str | None:
    return next((d for d in FRONT_DOORS if module == d or module.startswith(d + ".")), None)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_design_allows(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_level_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_front_doors_stand_apart_and_the_library_imports_none() -> None:
    """controller/ is the library; cli, gateway and mcp are thin front doors over it."""
    offenders: dict[str, list[str]] = {}
    for path in (ROOT / "controller").rglob("*.py"):
        if path == ROOT / "controller" / "__main__.py":
            continue  # `python -m controller` is the program: it starts the terminal front door
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = front_door_of(module)
        bad = sorted(
            imported
            for imported in imported_modules(path)
            if (door := front_door_of(imported)) is not None and door != own
        )
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_the_rule_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from controller.client import CorralClient\nimport worker.node\n")
    assert imported_top_level_packages(bad) == {"controller", "worker"}
    assert front_door_of("controller.cli.render") == "controller.cli"
    assert front_door_of("controller.client") is None
    assert front_door_of("controller.climate") is None

    # A broker URL nothing listens on: a connection attempt at import time would fail.
    code = (
        "import broker, controller, worker\n"
        "from broker import build_settings, make_celery_app\n"
        "make_celery_app(build_settings())\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"CORRAL_BROKER_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
