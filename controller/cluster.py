"""Reading the cluster's state from Redis: which nodes exist, which are up, how busy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError
from redis import Redis

from broker import names
from broker.schemas import NodeInfo
from controller.breaker import Breakers, BreakerState, parse_breakers
from controller.router import NodeState

log = logging.getLogger(__name__)


# One round trip for the whole cluster view: every node's last heartbeat, whether its liveness
# key still exists, how many jobs wait in its queue (one list per priority step), and every
# circuit breaker's state. Key names come in as arguments so broker.names stays the only place
# they are spelled.
_READ_NODES_LUA = """
local nodes = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local name = entries[i]
  local alive = redis.call('EXISTS', ARGV[1] .. name .. ARGV[2])
  local queue = ARGV[3] .. name
  local queued = redis.call('LLEN', queue)
  for s = 5, #ARGV do queued = queued + redis.call('LLEN', queue .. ARGV[4] .. ARGV[s]) end
  table.insert(nodes, {name, entries[i + 1], alive, queued})
end
local t = redis.call('TIME')
return {nodes, redis.call('HGETALL', KEYS[2]), t[1], t[2]}
"""


def preload_scripts(redis: Redis) -> None:
    """Load the Lua script up front: no NOSCRIPT miss on the first call (which fakeredis's
    TCP server, the demo's fallback broker, answers by closing the connection)."""
    redis.script_load(_READ_NODES_LUA)
    Breakers.preload_into(redis)


@dataclass(frozen=True)
class ClusterView:
    nodes: list[NodeState]
    breakers: dict[str, BreakerState]
    redis_time: float
    """Redis's clock when this was read: breakers' cooldowns are measured against it."""


def read_cluster(redis: Redis) -> ClusterView:
    """Every node that ever heartbeated (until forgotten), with liveness and queue depth, and
    every breaker's state, in one round trip."""
    alive_prefix, alive_suffix = names.node_alive_key("\0").split("\0")
    queue_prefix = names.node_queue("")
    steps = [str(step) for step in names.PRIORITY_STEPS if step != 0]
    # register_script sends EVALSHA (the script body only once per server).
    script = redis.register_script(_READ_NODES_LUA)
    rows, breaker_entries, seconds, micros = script(
        keys=[names.NODES_HASH, names.BREAKERS_HASH],
        args=[alive_prefix, alive_suffix, queue_prefix, names.PRIORITY_SEPARATOR, *steps],
    )
    breakers = parse_breakers(breaker_entries)
    return ClusterView(
        nodes=_node_states(rows),
        breakers=breakers,
        redis_time=int(seconds) + int(micros) / 1_000_000,
    )


def read_nodes(redis: Redis) -> list[NodeState]:
    """The nodes only (see ``read_cluster``)."""
    return read_cluster(redis).nodes


def _node_states(rows: list[list[bytes]]) -> list[NodeState]:
    states: list[NodeState] = []
    for name, payload, alive, queued in sorted(rows):
        try:
            info = NodeInfo.model_validate_json(payload)
        except ValidationError:
            # A node running another schema version: left out rather than breaking routing.
            log.warning("ignoring unreadable heartbeat of node %r", name.decode(errors="replace"))
            continue
        states.append(NodeState(info=info, up=bool(alive), queued=int(queued)))
    return states


def forget_node(redis: Redis, name: str) -> bool:
    """Drop a node from the listing (it reappears at its next heartbeat)."""
    return bool(redis.hdel(names.NODES_HASH, name))
