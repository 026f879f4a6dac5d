"""Reading the cluster's state from Redis: which nodes exist, which are up, how busy."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from redis import Redis

from broker import names
from broker.schemas import NodeInfo
from controller.router import NodeState

log = logging.getLogger(__name__)


# One round trip for the whole cluster view: every node's last heartbeat, whether its liveness
# key still exists, and how many jobs wait in its queue. Key names come in as arguments so this
# module's builders stay the only place they are spelled.
_READ_NODES_LUA = """
local out = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local name = entries[i]
  local alive = redis.call('EXISTS', ARGV[1] .. name .. ARGV[2])
  local queued = redis.call('LLEN', ARGV[3] .. name)
  table.insert(out, {name, entries[i + 1], alive, queued})
end
return out
"""


def preload_scripts(redis: Redis) -> None:
    """Load the Lua script up front: no NOSCRIPT miss on the first call (which fakeredis's
    TCP server, the demo's fallback broker, answers by closing the connection)."""
    redis.script_load(_READ_NODES_LUA)


def read_nodes(redis: Redis) -> list[NodeState]:
    """Every node that ever heartbeated (until forgotten), with liveness and queue depth."""
    alive_prefix, alive_suffix = names.node_alive_key("\0").split("\0")
    queue_prefix = names.node_queue("")
    # register_script sends EVALSHA (the script body only once per server).
    script = redis.register_script(_READ_NODES_LUA)
    rows = script(keys=[names.NODES_HASH], args=[alive_prefix, alive_suffix, queue_prefix])
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
