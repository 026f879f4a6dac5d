"""``corral doctor --probe``: a tiny real job through every node and backend, timed.

Each probe is pinned to one node and one of its backend's models and may not move elsewhere
(one attempt), so a failure is that backend's and its time to first token is its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker.errors import CorralError
from broker.schemas import (
    BackendInfo,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    InterruptedEvent,
)
from controller.client import CorralClient, make_spec
from controller.health import Check, Status
from controller.router import NodeState

PROBE_PROMPT = "Reply with one word: ok"
PROBE_MAX_TOKENS = 4


@dataclass(frozen=True)
class ProbeTarget:
    node: str
    backend: str
    model: str


def probe_targets(nodes: list[NodeState]) -> tuple[list[ProbeTarget], list[Check]]:
    """One target per up node's healthy backend: a loaded chat model if it has one (no swap),
    else its first chat model. Backends with nothing to probe are reported as skipped."""
    targets: list[ProbeTarget] = []
    skipped: list[Check] = []
    for node in nodes:
        if not node.up:
            continue
        taken: set[str] = set()
        for backend in node.info.backends:
            if not backend.healthy:
                continue  # already a failed check; a probe would only repeat it
            model = _model_to_probe(backend, taken)
            if model is None:
                skipped.append(
                    Check(
                        "probe",
                        f"{node.name}/{backend.name}",
                        Status.SKIP,
                        "skipped: no chat model of its own to probe with",
                    )
                )
                continue
            taken.add(model)
            targets.append(ProbeTarget(node.name, backend.name, model))
    return targets, skipped


def _model_to_probe(backend: BackendInfo, taken: set[str]) -> str | None:
    # A model another backend of the node also has could be routed there instead.
    chat = [m for m in backend.models if m.serves_chat() and m.name not in taken]
    chat.sort(key=lambda m: not m.loaded)
    return chat[0].name if chat else None


def run_probe(client: CorralClient, target: ProbeTarget, timeout_s: float) -> Check:
    label = f"{target.node}/{target.backend}"
    spec = make_spec(
        PROBE_PROMPT,
        node=target.node,
        model=target.model,
        options=GenerationOptions(max_tokens=PROBE_MAX_TOKENS),
        max_attempts=1,
        first_token_timeout_s=timeout_s,
    )
    sent = time.perf_counter()
    first_token_ms: float | None = None
    try:
        for event in client.submit(spec).events(timeout_s):
            if isinstance(event, DeltaEvent) and first_token_ms is None:
                first_token_ms = (time.perf_counter() - sent) * 1000
            if isinstance(event, DoneEvent):
                total_ms = (time.perf_counter() - sent) * 1000
                served = f"{event.result.node}/{event.result.backend}"
                where = "" if served == label else f" (served by {served})"
                ttft = f"{first_token_ms:.0f} ms" if first_token_ms is not None else "none"
                return Check(
                    "probe",
                    label,
                    Status.OK,
                    f"{target.model}: first token {ttft}, done in {total_ms:.0f} ms{where}",
                )
            if isinstance(event, ErrorEvent | InterruptedEvent) and event.final:
                return _failed(label, target, f"{event.code}: {event.message}")
    except CorralError as exc:
        return _failed(label, target, str(exc))
    return _failed(label, target, "the stream ended without an answer")


def _failed(label: str, target: ProbeTarget, why: str) -> Check:
    return Check(
        "probe",
        label,
        Status.FAIL,
        f"{target.model}: {why}",
        f"read the worker's log on {target.node}; `corral ask --model {target.model} "
        f"'@{target.node} hi'` takes the same path",
    )
