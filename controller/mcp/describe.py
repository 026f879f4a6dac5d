"""What the MCP server tells an agent about the cluster: pure functions of the nodes and config.

The descriptions of ``ask`` and ``fanout`` are written from the nodes that are up and the
``aliases`` of the settings each time the agent lists the tools, so it knows which models and
nodes exist and what each is good for. The status resources are rebuilt on every read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from broker.schemas import ModelInfo
from controller.router import Candidate, NodeState


def _model_note(model: ModelInfo) -> str:
    facts = [model.parameter_size, model.quantization, *sorted(model.capabilities)]
    known = [f for f in facts if f]
    return f" ({', '.join(known)})" if known else ""


def models_by_name(nodes: Sequence[NodeState]) -> dict[str, dict[str, Any]]:
    """Every model a node that is up offers: which nodes hold it, where it is loaded."""
    found: dict[str, dict[str, Any]] = {}
    for state in nodes:
        if not state.up:
            continue
        for backend in state.info.backends:
            for model in backend.models:
                entry = found.setdefault(
                    model.name,
                    {
                        "model": model.name,
                        "nodes": [],
                        "loaded_on": [],
                        "capabilities": sorted(model.capabilities),
                        "note": _model_note(model).strip(" ()"),
                    },
                )
                if state.name not in entry["nodes"]:
                    entry["nodes"].append(state.name)
                if model.loaded and state.name not in entry["loaded_on"]:
                    entry["loaded_on"].append(state.name)
    return dict(sorted(found.items()))


def model_rows(
    nodes: Sequence[NodeState], aliases: Mapping[str, Sequence[str]]
) -> list[dict[str, Any]]:
    """``list_models``: each model, then each alias with the models it tries in order."""
    rows = list(models_by_name(nodes).values())
    for alias, targets in sorted(aliases.items()):
        rows.append({"alias": alias, "tries": list(targets)})
    return rows


def node_rows(nodes: Sequence[NodeState]) -> list[dict[str, Any]]:
    """``list_nodes`` and ``corral://status.json``: one row per node, down ones included."""
    return [
        {
            "node": state.name,
            "up": state.up,
            "tags": sorted(state.info.tags),
            "backends": [b.kind for b in state.info.backends],
            "models": sorted(state.info.model_names()),
            "loaded": sorted({m.name for b in state.info.backends for m in b.models if m.loaded}),
            "load": state.load,
            "capacity": state.info.capacity,
        }
        for state in sorted(nodes, key=lambda s: s.name)
    ]


def cluster_summary(nodes: Sequence[NodeState], aliases: Mapping[str, Sequence[str]]) -> str:
    """A few lines for tool descriptions: models, aliases, nodes and their tags."""
    up = [s for s in nodes if s.up]
    if not up:
        return "No node is up right now; call list_nodes to check again."
    lines = ["Models: " + "; ".join(_describe_models(up)) + "."]
    if aliases:
        lines.append(
            "Aliases (first choice first): "
            + "; ".join(f"{a} -> {', '.join(t)}" for a, t in sorted(aliases.items()))
            + "."
        )
    lines.append(
        "Nodes: "
        + "; ".join(
            f"{s.name}" + (f" (good for: {', '.join(sorted(s.info.tags))})" if s.info.tags else "")
            for s in sorted(up, key=lambda s: s.name)
        )
        + "."
    )
    return "\n".join(lines)


def _describe_models(up: Sequence[NodeState]) -> list[str]:
    notes: dict[str, str] = {}
    where: dict[str, list[str]] = {}
    for state in up:
        for backend in state.info.backends:
            for model in backend.models:
                notes.setdefault(model.name, _model_note(model))
                where.setdefault(model.name, []).append(state.name)
    return [
        f"{name}{notes[name]} on {', '.join(sorted(set(where[name])))}" for name in sorted(where)
    ]


def routing_reason(candidate: Candidate, *, pinned: bool, rerouted_from: Sequence[str]) -> str:
    """Why the job ran where it did, in the router's own order of preference."""
    if pinned:
        reason = f"pinned to node {candidate.node}"
    elif candidate.sticky:
        reason = "the node holding this session"
    elif candidate.reason:
        reason = candidate.reason  # the router's: the tier, and the cheaper routes skipped
    elif candidate.choice > 0:
        reason = f"alias choice {candidate.choice + 1} (earlier choices unavailable)"
    elif candidate.model_loaded:
        reason = "model already loaded there"
    else:
        reason = f"most spare capacity ({candidate.spare} free slots)"
    if rerouted_from:
        reason += f"; moved here after {', '.join(rerouted_from)} failed"
    return reason


def status_text(nodes: Sequence[NodeState], aliases: Mapping[str, Sequence[str]]) -> str:
    """``corral://status``: who is up, with what, how busy."""
    if not nodes:
        return "No nodes have registered yet (start one with `corral worker`)."
    lines = []
    for row in node_rows(nodes):
        state = "up" if row["up"] else "DOWN"
        tags = f" tags={','.join(row['tags'])}" if row["tags"] else ""
        lines.append(
            f"{row['node']}: {state}, load {row['load']}/{row['capacity']}{tags}, "
            f"models {', '.join(row['models']) or '-'}"
            + (f" (loaded: {', '.join(row['loaded'])})" if row["loaded"] else "")
        )
    for alias, targets in sorted(aliases.items()):
        lines.append(f"alias {alias}: {', '.join(targets)}")
    return "\n".join(lines)
