"""Why the router chose a route: the cheaper routes it skipped, and what was wrong with each.

The order itself is the router's (``controller.router``: model by model of the alias or
priority list, each model's routes cheapest tier first). This module only explains a choice
once made, for the answer's ``reason``; it does no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from broker.schemas import JobSpec, canonical_model_name
from broker.tiers import TIER_ORDER, tier_of_kind
from controller.node_index import NodeIndex
from controller.router import PRIORITY_ALIAS, Candidate, NodeState, wanted_models

__all__ = ["explain_choice"]

_MAX_LISTED = 5
"""Routes named per skipped (model, tier); the rest are counted."""
_MAX_REASON = 900
"""The reason travels in the task message: long lists of skipped routes are cut."""


def explain_choice(
    spec: JobSpec,
    chosen: Candidate,
    nodes: Sequence[NodeState],
    blocked: Collection[str],
    *,
    aliases: Mapping[str, Sequence[str]],
    failed: Collection[str] = (),
) -> str:
    """One line: the model, tier and route chosen, and every route of a cheaper (model, tier)
    left out with its cause. ``blocked``: open breakers (nodes and ``node/backend``);
    ``failed``: ``node/backend`` targets that already failed this job."""
    where = f"{chosen.model} on {chosen.tier} {chosen.node}/{chosen.backend}"
    if chosen.sticky:
        return f"{where}: the session's node"
    if chosen.choice == 0 and TIER_ORDER.get(chosen.tier, 0) == 0:
        # Nothing ranks ahead of the first model's cheapest tier: no routes to look at (the
        # usual case, kept off the path to the first token).
        if spec.model is None and not aliases.get(PRIORITY_ALIAS):
            return f"{where}: no model asked, the cheapest tier's least loaded route"
        return f"{where}: the first choice's cheapest tier"
    wanted = wanted_models(spec, aliases)
    if wanted is None:
        return f"{where}: no model asked, the cheapest tier's least loaded route"
    index = nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)
    chosen_rank = (chosen.choice, TIER_ORDER.get(chosen.tier, 0))
    skipped: list[str] = []
    for choice, model in enumerate(wanted[: chosen.choice + 1]):
        holders = index.holders(canonical_model_name(model))
        if not holders and choice < chosen.choice:
            skipped.append(f"{model}: no node serves it")
        why_by_tier: dict[str, list[str]] = {}
        for holder in holders:
            state = index.state(holder.node)
            if state is None:
                continue
            backend = state.info.backends[holder.offer.position]
            tier = tier_of_kind(backend.kind)
            if (choice, TIER_ORDER.get(tier, 0)) >= chosen_rank:
                continue
            why_by_tier.setdefault(tier, []).append(
                _why_not(
                    state, holder.offer.target, backend.healthy, backend.error, blocked, failed
                )
            )
        for skipped_tier in sorted(why_by_tier, key=lambda t: TIER_ORDER.get(t, 0)):
            why = sorted(why_by_tier[skipped_tier])
            more = f" and {len(why) - _MAX_LISTED} more" if len(why) > _MAX_LISTED else ""
            causes = ", ".join(why[:_MAX_LISTED]) + more
            skipped.append(f"{model} {skipped_tier}: {causes}")
    if not skipped:
        return f"{where}: the first choice's cheapest tier"
    return f"{where}; skipped {'; '.join(skipped)}"[:_MAX_REASON]


def _why_not(
    state: NodeState,
    target: str,
    healthy: bool,
    error: str | None,
    blocked: Collection[str],
    failed: Collection[str],
) -> str:
    if not state.up:
        return f"{state.name} down"
    if target in failed:
        return f"{target} failed this job"
    if not healthy:
        return f"{target} unhealthy ({error or 'no answer'})"
    if state.name in blocked or target in blocked:
        return f"{target} breaker open (failing or rate limited)"
    return f"{target} held back (its worker was lost, or its breaker is being probed)"
