"""Reading the cluster's state from Redis: which nodes exist, which are up, how busy."""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from redis import Redis

from broker import names
from broker.nodeload import NodeLoad, with_load
from broker.ratelimits import RateCount, parse_counters
from broker.schemas import NodeInfo
from controller.breaker import Breakers, BreakerState, parse_breakers
from controller.node_index import NodeIndex
from controller.router import NodeState

log = logging.getLogger(__name__)

FREEZE_AFTER_PARSING = 100
"""Whole inventories parsed in one read from which their objects leave the garbage collector's
view (``settle_parsed_inventories``)."""


# One round trip for the whole cluster view: every node's load (broker.nodeload), whether its
# liveness key still exists, how many jobs wait in its queue (one list per priority step), its
# inventory digest and, only when that digest is not the one the caller already holds, its
# whole NodeInfo; every circuit breaker's state; and the rate-limit counters (broker.ratelimits).
# A node stored by an older worker (no load) always comes whole. Key names come in as arguments
# so broker.names stays the only place they are spelled. ARGV: alive prefix, alive suffix, queue
# prefix, priority separator, the number of priority steps, the steps, then (name, digest)
# pairs the caller holds.
READ_NODES_LUA = """
local steps = tonumber(ARGV[5])
local known = {}
for i = 6 + steps, #ARGV, 2 do known[ARGV[i]] = ARGV[i + 1] end
local nodes = {}
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  local alive = redis.call('EXISTS', ARGV[1] .. name .. ARGV[2])
  local queue = ARGV[3] .. name
  local queued = redis.call('LLEN', queue)
  for s = 6, 5 + steps do queued = queued + redis.call('LLEN', queue .. ARGV[4] .. ARGV[s]) end
  local load = redis.call('HGET', KEYS[3], name) or ''
  local digest = redis.call('HGET', KEYS[4], name) or ''
  local whole = ''
  if load == '' or digest == '' or known[name] ~= digest then
    whole = redis.call('HGET', KEYS[1], name)
  end
  table.insert(nodes, {name, alive, queued, load, digest, whole})
end
local t = redis.call('TIME')
return {nodes, redis.call('HGETALL', KEYS[2]), t[1], t[2], redis.call('HGETALL', KEYS[5])}
"""


def preload_scripts(redis: Redis) -> None:
    """Load the Lua script up front: no NOSCRIPT miss on the first call (which fakeredis's
    TCP server, the demo's fallback broker, answers by closing the connection)."""
    redis.script_load(READ_NODES_LUA)
    Breakers.preload_into(redis)


@dataclass(frozen=True)
class ClusterView:
    nodes: NodeIndex
    """The nodes, indexed for the router (a sequence of NodeState too)."""
    breakers: dict[str, BreakerState]
    redis_time: float
    """Redis's clock when this was read: breakers' cooldowns are measured against it."""
    rate_counters: dict[str, RateCount] = field(default_factory=dict)
    """The configured rate limits' counts (broker.ratelimits), by scope."""


class ClusterReader:
    """Reads the cluster view, keeping each node's parsed inventory between reads.

    A read transfers and validates the load of every node (a few hundred bytes each) and the
    whole NodeInfo only of nodes whose inventory changed since the last read; the router
    index is updated from the previous view's for those nodes only. One per client; reads
    from several threads take turns."""

    def __init__(self) -> None:
        self._inventories: dict[str, tuple[str, NodeInfo]] = {}
        self._index: NodeIndex | None = None
        self._lock = threading.Lock()
        # Per node: the load bytes last applied, to which inventory, and the NodeInfo it made.
        self._applied: dict[str, tuple[bytes, NodeInfo, NodeInfo]] = {}
        self._applied_now: dict[str, tuple[bytes, NodeInfo, NodeInfo]] = {}

    def read(self, redis: Redis) -> ClusterView:
        """Every node that ever heartbeated (until forgotten), with liveness and queue depth,
        and every breaker's state, in one round trip."""
        with self._lock:
            keys, args = self.request()
            # register_script sends EVALSHA (the script body only once per server).
            return self.apply(redis.register_script(READ_NODES_LUA)(keys=keys, args=args))

    def request(self) -> tuple[list[str], list[str | int]]:
        """The read script's keys and arguments, naming the inventories already held. No I/O:
        the blocking and the asyncio reader both send it (one at a time per reader)."""
        alive_prefix, alive_suffix = names.node_alive_key("\0").split("\0")
        steps = [str(step) for step in names.PRIORITY_STEPS if step != 0]
        known = [part for name, (digest, _) in self._inventories.items() for part in (name, digest)]
        keys = [
            names.NODES_HASH,
            names.BREAKERS_HASH,
            names.NODE_LOADS_HASH,
            names.NODE_DIGESTS_HASH,
            names.RATE_COUNTERS_HASH,
        ]
        args: list[str | int] = [
            alive_prefix,
            alive_suffix,
            names.node_queue(""),
            names.PRIORITY_SEPARATOR,
            len(steps),
            *steps,
            *known,
        ]
        return keys, args

    def apply(self, reply: list[Any]) -> ClusterView:
        """The view from the script's reply to ``request``, updating what this reader keeps."""
        rows, breaker_entries, seconds, micros, counter_entries = reply
        states = self._node_states(rows)
        self._index = NodeIndex(states, previous=self._index)
        if sum(1 for row in rows if row[5]) >= FREEZE_AFTER_PARSING:
            settle_parsed_inventories()
        return ClusterView(
            nodes=self._index,
            breakers=parse_breakers(breaker_entries),
            redis_time=int(seconds) + int(micros) / 1_000_000,
            rate_counters=parse_counters(counter_entries),
        )

    def _node_states(self, rows: list[list[bytes]]) -> list[NodeState]:
        states: list[NodeState] = []
        seen: dict[str, tuple[str, NodeInfo]] = {}
        for raw_name, alive, queued, load, digest, whole in sorted(rows):
            name = raw_name.decode(errors="replace")
            try:
                info = self._info(name, load, digest.decode(), whole, seen)
            except ValidationError:
                # A node running another schema version: left out rather than breaking routing.
                log.warning("ignoring unreadable heartbeat of node %r", name)
                continue
            states.append(NodeState(info=info, up=bool(alive), queued=int(queued)))
        self._inventories = seen
        self._applied, self._applied_now = self._applied_now, {}
        return states

    def _info(
        self,
        name: str,
        load: bytes,
        digest: str,
        whole: bytes,
        seen: dict[str, tuple[str, NodeInfo]],
    ) -> NodeInfo:
        # Sent whole when the digest we hold is not the stored one; else we hold it.
        inventory = NodeInfo.model_validate_json(whole) if whole else self._inventories[name][1]
        if digest:
            seen[name] = (digest, inventory)
        if not load:
            return inventory
        # Reads come faster than beats (route_cache_s < heartbeat_interval_s): most find the
        # load they already applied.
        last = self._applied.get(name)
        if last is not None and last[0] == load and last[1] is inventory:
            self._applied_now[name] = last
            return last[2]
        node_load = NodeLoad.model_validate_json(load)
        if node_load.inventory != digest:
            # The load of a newer inventory than the one stored (a beat between the two
            # writes): its numbers still belong to this node.
            log.debug("node %s: load and inventory from different beats", name)
        info = with_load(inventory, node_load)
        self._applied_now[name] = (load, inventory, info)
        return info


def settle_parsed_inventories() -> None:
    """Take every object alive now out of the cyclic garbage collector's generations.

    A large fleet's inventories are hundreds of thousands of objects (1,000 nodes of 100
    models: about 750,000) that live as long as their nodes do. Left in the oldest
    generation, each full collection walks all of them: about 15 ms of CPU at 1,000 nodes,
    paid by whichever routing decision (or request) happens to trigger it. Frozen
    (``gc.freeze``), they are skipped; they are still freed by reference counting when an
    inventory is replaced (inventories hold no reference cycles). The collection first
    keeps garbage that exists now from being frozen with them; an object alive now that
    later ends up in a reference cycle is not reclaimed, which is why this runs only after
    a read that parsed many inventories (a controller's first read of a large fleet, a
    fleet restarting), never for a small cluster.
    """
    gc.collect()
    gc.freeze()


def read_cluster(redis: Redis) -> ClusterView:
    """The cluster view, read afresh (see ``ClusterReader``, which keeps inventories)."""
    return ClusterReader().read(redis)


def read_nodes(redis: Redis) -> list[NodeState]:
    """The nodes only (see ``read_cluster``)."""
    return list(read_cluster(redis).nodes)


def forget_node(redis: Redis, name: str) -> bool:
    """Drop a node from the listing (it reappears at its next heartbeat)."""
    pipe = redis.pipeline(transaction=True)
    pipe.hdel(names.NODES_HASH, name)
    pipe.hdel(names.NODE_LOADS_HASH, name)
    pipe.hdel(names.NODE_DIGESTS_HASH, name)
    removed, _, _ = pipe.execute()
    return bool(removed)
