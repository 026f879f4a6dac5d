"""Keep a worker process from importing what it never runs.

Imported first by ``worker/__init__.py``, before httpx, redis-py, kombu and Celery. Measured
on the project's VM (``python -m benchmarks.footprint``), a node fronting one Ollama saves
about 3.9 MB of resident memory this way, about 6% of it:

- httpx imports its own command-line program (``httpx._main``) when click, rich and pygments
  are installed, as they are for corral's CLI: some 65 modules, 2.8 MB. The worker never runs
  it; httpx falls back to a stub ``main`` when the import fails, as it does without them.
- redis-py imports OpenTelemetry's metrics SDK when it is installed (the ``otel`` extra, for
  the controller's traces), for an opt-in metrics feature corral never turns on: about 3 MB
  and 0.1 s of start-up; without it redis-py carries on as without the SDK.
- kombu registers a YAML serializer when PyYAML is importable, and Celery's worker imports
  psutil for its memory-sampling remote commands (``memsample``, which then answers nothing).
  corral accepts JSON messages only, so both are imported here with those two held back;
  corral's own code imports them later where it needs them (a ``corral.yaml``, a machine
  without /proc/meminfo), which this does not prevent.
- redis-py also imports OpenTelemetry's metrics API for that opt-in feature: 0.3 MB. redis-py
  is imported here with it held back, so redis-py sees no OpenTelemetry; anything else may
  still import the API later.
- hiredis, redis-py's C reply parser (a dependency for the controller's sake: it parses every
  pub/sub message a client follows), costs a worker 0.3 MB; a worker parses a few replies per
  job, so redis-py is imported here with it held back and uses its Python parser.
- zoneinfo (which Celery imports) reads one build variable, TZPATH, through sysconfig, and
  sysconfig then keeps every variable of the interpreter's build in two dicts: about 0.1 MB
  of an idle worker. zoneinfo is imported here and sysconfig's cache let go afterwards;
  anything that asks sysconfig later gets its variables read again.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import cast

_NEVER_RUN = ("httpx._main", "opentelemetry.sdk.metrics")
_HELD_BACK = ("yaml", "psutil", "opentelemetry.metrics", "hiredis")
_IMPORTED_WITHOUT = ("kombu.serialization", "celery.utils.debug", "redis")


def keep_lean() -> None:
    # None in sys.modules makes an import fail with ImportError, which these libraries expect
    # of a package that is not installed (typeshed does not allow for it, hence the cast).
    modules = cast("dict[str, ModuleType | None]", sys.modules)
    for name in _NEVER_RUN:
        modules.setdefault(name, None)
    held = [name for name in _HELD_BACK if name not in sys.modules]
    if all(name in sys.modules for name in _IMPORTED_WITHOUT):
        return  # too late (already imported with them), or done before
    for name in held:
        modules[name] = None
    try:
        for module in _IMPORTED_WITHOUT:
            importlib.import_module(module)
    finally:
        for name in held:
            del modules[name]


def import_zoneinfo_without_build_config() -> None:
    import sysconfig  # noqa: PLC0415

    if "zoneinfo" in sys.modules or any(m.startswith("_sysconfigdata") for m in sys.modules):
        return  # imported before, or the build variables were already in use
    import zoneinfo  # noqa: F401, PLC0415

    for name in [m for m in sys.modules if m.startswith("_sysconfigdata")]:
        del sys.modules[name]
    # sysconfig's cache, as it is before its first use (3.12 added the second flag); its
    # next caller fills it again.
    sysconfig._CONFIG_VARS = None  # type: ignore[attr-defined]
    if hasattr(sysconfig, "_CONFIG_VARS_INITIALIZED"):
        sysconfig._CONFIG_VARS_INITIALIZED = False


keep_lean()
import_zoneinfo_without_build_config()
