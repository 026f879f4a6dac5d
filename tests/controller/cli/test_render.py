"""What `corral nodes`, `corral models` and a model operation's progress look like, rendered
from made-up cluster data (no Redis)."""

from __future__ import annotations

import io
import re
import time
from datetime import datetime

from rich.console import Console, RenderableType

from broker.schemas import (
    BackendInfo,
    GpuInfo,
    MemoryInfo,
    ModelInfo,
    NodeInfo,
    ProgressEvent,
)
from controller.breaker import BreakerPhase, BreakerState
from controller.cli.render import (
    ModelOpProgress,
    breaker_notes,
    context_size,
    disk_size,
    fleet_model_json,
    fleet_models,
    loaded_state,
    model_notes,
    models_table,
    nodes_table,
)
from controller.router import NodeState

GIB = 2**30
NOW = 1_800_000_000.0


def render(renderable: RenderableType, width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, highlight=False, color_system=None).print(renderable)
    return out.getvalue()


def cells(line: str) -> list[str]:
    """A borderless table row's cells: columns are at least two spaces apart."""
    return re.split(r"\s{2,}", line.strip())


def ollama(
    name: str = "ollama",
    *,
    models: tuple[ModelInfo, ...] = (),
    in_flight: int = 0,
    capacity: int = 4,
    latency_ms: float | None = None,
    healthy: bool = True,
    error: str | None = None,
) -> BackendInfo:
    return BackendInfo(
        name=name,
        kind="ollama",
        url="http://127.0.0.1:11434",
        healthy=healthy,
        error=error,
        capacity=capacity,
        in_flight=in_flight,
        latency_ms=latency_ms,
        manages_models=True,
        models=models,
    )


def node(
    name: str,
    *backends: BackendInfo,
    up: bool = True,
    queued: int = 0,
    tags: frozenset[str] = frozenset(),
    memory: MemoryInfo | None = None,
    gpus: tuple[GpuInfo, ...] = (),
    cpu_load: float | None = None,
    sent_at: float = NOW,
) -> NodeState:
    info = NodeInfo(
        name=name,
        version="0",
        tags=tags,
        backends=backends,
        memory=memory,
        gpus=gpus,
        cpu_load=cpu_load,
        in_flight=sum(b.in_flight for b in backends),
        capacity=4,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=sent_at,
    )
    return NodeState(info=info, up=up, queued=queued)


LLAMA = ModelInfo(
    name="llama3.1:8b",
    size_bytes=4_920_753_328,
    family="llama",
    parameter_size="8.0B",
    quantization="Q4_K_M",
    context_length=131072,
    capabilities=frozenset({"chat", "tools"}),
)


# --- corral nodes --------------------------------------------------------------------------


def test_nodes_table_shows_gpu_cpu_backend_load_latency_and_breakers_within_120_columns() -> None:
    gpu1 = node(
        "gpu1",
        ollama(models=(LLAMA.model_copy(update={"loaded": True}),), in_flight=1, latency_ms=182),
        ollama("vllm", models=(ModelInfo(name="qwen2.5-coder:7b"),), capacity=8),
        tags=frozenset({"gpu", "code"}),
        memory=MemoryInfo(total_bytes=64 * GIB, available_bytes=40 * GIB),
        gpus=(GpuInfo(name="RTX 4090", total_bytes=24 * GIB, free_bytes=7 * GIB),),
        cpu_load=0.35,
        queued=2,
    )
    pi2 = node(
        "pi2",
        ollama(models=(ModelInfo(name="phi3:mini"),)),
        up=False,
        sent_at=NOW - 150,
    )
    breakers = {
        "gpu1/vllm": BreakerState(open=True, failures=3, opened_at=NOW - 18),
        "pi2": BreakerState(open=True, failures=5, opened_at=NOW - 100),
        "gpu1/ollama": BreakerState(open=False, failures=1, opened_at=0),
    }
    notes = breaker_notes(breakers, NOW, cooldown_s=30)
    text = render(nodes_table([gpu1, pi2], notes, now=NOW))

    assert max(len(line) for line in text.splitlines()) <= 120
    rows = [cells(line) for line in text.splitlines() if line.strip()]
    gpu1_at = rows.index(next(row for row in rows if row[0] == "gpu1"))
    # A row per backend: its jobs in flight of its capacity, its time to first token, its
    # models; the node's cells (state, RAM, GPU, CPU load) on its first row and below.
    assert rows[gpu1_at] == [
        "gpu1",
        "up",
        "ollama",
        "1/4",
        "182 ms",
        "llama3.1:8b*",
        "RAM 40.0/64.0",
    ]
    assert rows[gpu1_at + 1] == ["code,gpu", "2 queued", "http://127.0.0.1:11434", "GPU 7.0/24.0"]
    assert rows[gpu1_at + 2] == ["CPU load 0.35"]
    assert rows[gpu1_at + 3] == ["vllm (ollama)", "0/8", "-", "qwen2.5-coder:7b"]
    assert rows[gpu1_at + 5] == ["breaker open (12s)"]
    # A down node says when it was last seen; its own breaker is past its cooldown.
    pi2_at = rows.index(next(row for row in rows if row[0] == "pi2"))
    assert rows[pi2_at][:2] == ["pi2", "down"]
    assert rows[pi2_at + 1][0] == "seen 2m ago"
    assert rows[pi2_at + 2][0] == "breaker half-open"


def test_breaker_notes_leave_out_closed_breakers_and_say_what_happens_next() -> None:
    breakers = {
        "pi2/ollama": BreakerState(open=True, failures=3, opened_at=NOW - 18),
        "gpu1": BreakerState(open=True, failures=4, opened_at=NOW - 31),
        "nuc": BreakerState(open=False, failures=2, opened_at=0),
    }
    notes = breaker_notes(breakers, NOW, cooldown_s=30)
    assert set(notes) == {"pi2/ollama", "gpu1"}
    assert notes["pi2/ollama"].phase is BreakerPhase.OPEN
    assert notes["pi2/ollama"].line == (
        "pi2/ollama: breaker open after 3 failures in a row; one probe job may try it in 12s"
    )
    assert notes["gpu1"].phase is BreakerPhase.HALF_OPEN
    assert notes["gpu1"].line == (
        "gpu1: breaker half-open after 4 failures in a row; the next job routed there is a probe"
    )


def test_nodes_table_keeps_a_node_without_backends() -> None:
    text = render(nodes_table([node("empty", memory=None)], now=NOW))
    assert "empty" in text and "up" in text


# --- corral models -------------------------------------------------------------------------


def test_models_table_sorts_by_model_then_node_and_says_what_is_loaded_until_when() -> None:
    until = NOW + 25 * 60
    nodes = [
        node(
            "pi2",
            ollama(
                models=(
                    LLAMA,
                    ModelInfo(name="phi3:mini", loaded=True, size_bytes=2_176_178_913),
                )
            ),
            up=False,
        ),
        node(
            "gpu1",
            ollama(
                models=(
                    LLAMA.model_copy(update={"loaded": True, "loaded_until": until}),
                    ModelInfo(name="nomic-embed-text:latest", capabilities=frozenset({"embed"})),
                )
            ),
        ),
        node("nuc", ollama(models=(LLAMA.model_copy(update={"loaded": True}),))),
    ]
    text = render(models_table(nodes, now=NOW), width=160)
    rows = [cells(line) for line in text.splitlines() if re.match(r"\s+\S+:\S+\s", line)]
    assert [(row[0], row[1]) for row in rows] == [
        ("llama3.1:8b", "gpu1"),
        ("llama3.1:8b", "nuc"),
        ("llama3.1:8b", "pi2 (down)"),
        ("nomic-embed-text:latest", "gpu1"),
        ("phi3:mini", "pi2 (down)"),
    ]
    gpu1_llama = rows[0]
    shown = datetime.fromtimestamp(until).strftime("%H:%M")
    assert gpu1_llama == [
        "llama3.1:8b",
        "gpu1",
        "ollama",
        "4.9 GB",
        "8.0B",
        "Q4_K_M",
        "128k",
        "chat,tools",
        f"loaded until {shown}",
    ]
    assert rows[1][-1] == "loaded (kept)"
    assert rows[2][-1] == "installed"
    assert rows[3][3:8] == ["-", "-", "-", "-", "embed"]  # nothing known is shown as "-"


def test_models_table_is_readable_at_120_columns() -> None:
    nodes = [node(f"node{i}", ollama(models=(LLAMA,))) for i in range(3)]
    text = render(models_table(nodes, now=NOW), width=120)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert text.count("llama3.1:8b") == 3


def test_loaded_state_shows_the_date_when_the_unload_is_not_today() -> None:
    far = LLAMA.model_copy(update={"loaded": True, "loaded_until": NOW + 3 * 86400})
    expected = datetime.fromtimestamp(NOW + 3 * 86400).strftime("%b %d %H:%M")
    assert loaded_state(far, NOW) == f"loaded until {expected}"


def test_sizes_and_context_lengths_read_as_ollama_writes_them() -> None:
    assert disk_size(4_920_753_328) == "4.9 GB"
    assert disk_size(274_302_450) == "274 MB"
    assert disk_size(None) == "-"
    assert context_size(131072) == "128k"
    assert context_size(2048) == "2k"
    assert context_size(3000) == "3000"
    assert context_size(None) == "-"


def test_model_json_rows_name_node_backend_and_every_model_field() -> None:
    nodes = [node("gpu1", ollama(models=(LLAMA,))), node("pi2", ollama(), up=False)]
    [row] = [fleet_model_json(r) for r in fleet_models(nodes)]
    assert row["node"] == "gpu1" and row["node_up"] is True
    assert row["backend"] == "ollama" and row["backend_kind"] == "ollama"
    assert row["name"] == "llama3.1:8b" and row["size_bytes"] == 4_920_753_328
    assert row["capabilities"] == ["chat", "tools"]
    assert row["loaded"] is False and row["loaded_until"] is None


def test_an_unhealthy_backend_is_named_with_its_error() -> None:
    nodes = [node("pi3", ollama(healthy=False, error="cannot connect to http://127.0.0.1:1"))]
    assert model_notes(nodes) == [
        "pi3/ollama: no models listed (cannot connect to http://127.0.0.1:1)"
    ]


# --- a model operation's progress ----------------------------------------------------------


def progress(status: str, completed: int | None = None, total: int | None = None) -> ProgressEvent:
    return ProgressEvent(
        job_id="op-12345678",
        seq=0,
        ts=time.time(),
        status=status,
        completed=completed,
        total=total,
    )


def run_display(events: list[ProgressEvent], succeeded: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, width=100, highlight=False, color_system=None)
    with ModelOpProgress(console, "pull llama3.1:8b: waiting for node gpu1") as display:
        for event in events:
            display.update(event)
        display.finish(succeeded)
    return out.getvalue()


def test_a_pull_shows_a_line_per_status_and_a_bar_with_bytes_per_layer() -> None:
    weights = 4_920_000_000
    text = run_display(
        [
            progress("pulling manifest"),
            progress("pulling 6a0746a1ec1a", 1_000_000_000, weights),
            # The node skips steps (ten a second at most): the layer's last one never came.
            progress("pulling 6a0746a1ec1a", 3_900_000_000, weights),
            progress("pulling 4fa551d4f938", 12_403, 12_403),
            progress("verifying sha256 digest"),
            progress("success"),
        ],
        succeeded=True,
    )
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    assert [line.split()[1:3] for line in lines] == [
        ["pulling", "manifest"],
        ["pulling", "6a0746a1ec1a"],
        ["pulling", "4fa551d4f938"],
        ["verifying", "sha256"],
        ["success"],
    ]
    assert all(line.startswith("✓") for line in lines)
    assert "4.9/4.9 GB" in lines[1]  # finished, although its last step was skipped
    assert "12.4/12.4 kB" in lines[2]
    assert "waiting for node" not in text


def test_a_failed_operation_crosses_the_step_it_stopped_at() -> None:
    text = run_display(
        [progress("pulling manifest"), progress("pulling 6a0746a1ec1a", 10, 4_920_000_000)],
        succeeded=False,
    )
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].startswith("✓ pulling manifest")
    assert lines[1].startswith("✗ pulling 6a0746a1ec1a")


def test_an_operation_without_progress_leaves_nothing_behind() -> None:
    assert run_display([], succeeded=True) == ""
