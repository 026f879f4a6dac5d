"""Reading the cluster's state from Redis: which nodes exist, which are up, how busy."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from redis import Redis

from broker import names
from broker.schemas import NodeInfo
from controller.router import NodeState

log = logging.getLogger(__name__)


def read_nodes(redis: Redis) -> list[NodeState]:
    """Every node that ever heartbeated (until forgotten), with liveness and queue depth.

    One round trip for the hash, one pipelined round trip for liveness and queue lengths.
    """
    raw: dict[bytes, bytes] = redis.hgetall(names.NODES_HASH)  # type: ignore[assignment]
    infos: list[NodeInfo] = []
    for name, payload in sorted(raw.items()):
        try:
            infos.append(NodeInfo.model_validate_json(payload))
        except ValidationError:
            # A node running another schema version: shown nowhere rather than crashing routing.
            log.warning("ignoring unreadable heartbeat of node %r", name.decode(errors="replace"))
    if not infos:
        return []
    pipe = redis.pipeline(transaction=False)
    for info in infos:
        pipe.exists(names.node_alive_key(info.name))
        pipe.llen(names.node_queue(info.name))
    answers = pipe.execute()
    return [
        NodeState(info=info, up=bool(answers[2 * i]), queued=int(answers[2 * i + 1]))
        for i, info in enumerate(infos)
    ]


def forget_node(redis: Redis, name: str) -> bool:
    """Drop a node from the listing (it reappears at its next heartbeat)."""
    return bool(redis.hdel(names.NODES_HASH, name))
