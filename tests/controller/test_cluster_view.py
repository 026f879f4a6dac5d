"""The cluster view over a real Redis: a heartbeat's inventory is sent and parsed only when it
changes; its load (in-flight jobs, latency, memory) is current at every read."""

from __future__ import annotations

import asyncio
import gc
import json

import redis
from redis.asyncio import Redis

from broker import names
from broker.schemas import BackendInfo, ModelInfo, NodeInfo
from controller.cluster import FREEZE_AFTER_PARSING, ClusterReader, forget_node, read_cluster
from worker.heartbeat import publish_node_info


def info(name: str, *, in_flight: int = 0, models: tuple[str, ...] = ("m1", "m2")) -> NodeInfo:
    backend = BackendInfo(
        name="sim",
        kind="simulated",
        healthy=True,
        capacity=4,
        in_flight=in_flight,
        latency_ms=10.0 + in_flight,
        models=tuple(ModelInfo(name=m) for m in models),
    )
    return NodeInfo(
        name=name,
        version="1",
        instance="abc123",
        backends=(backend,),
        in_flight=in_flight,
        capacity=4,
        heartbeat_interval_s=30,
        started_at=0,
        sent_at=float(in_flight),
    )


def publish(url: str, beat: NodeInfo, stored: str | None = None) -> str:
    async def go() -> str:
        client = Redis.from_url(url)
        try:
            return await publish_node_info(client, beat, stored=stored)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_an_unchanged_inventory_is_stored_once_and_the_load_every_beat(broker_url: str) -> None:
    db = redis.Redis.from_url(broker_url)
    digest = publish(broker_url, info("pi1"))
    whole = db.hget(names.NODES_HASH, "pi1")
    assert publish(broker_url, info("pi1", in_flight=3), stored=digest) == digest
    assert db.hget(names.NODES_HASH, "pi1") == whole  # not sent again
    (state,) = read_cluster(db).nodes
    assert state.info.in_flight == 3
    assert state.info.backends[0].in_flight == 3
    assert state.info.backends[0].latency_ms == 13.0
    assert state.up


def test_a_changed_inventory_is_stored_and_read_again(broker_url: str) -> None:
    db = redis.Redis.from_url(broker_url)
    reader = ClusterReader()
    digest = publish(broker_url, info("pi1"))
    first = reader.read(db).nodes[0]
    publish(broker_url, info("pi1", in_flight=1), stored=digest)
    second = reader.read(db).nodes[0]
    # The parsed models are kept between reads: nothing but the load was read again.
    assert second.info.backends[0].models is first.info.backends[0].models
    assert second.info.in_flight == 1
    new_digest = publish(broker_url, info("pi1", models=("m1", "m3")), stored=digest)
    assert new_digest != digest
    third = reader.read(db).nodes[0]
    assert third.info.model_names() == {"m1", "m3"}


def test_a_beat_after_redis_lost_its_data_stores_the_whole_inventory(broker_url: str) -> None:
    db = redis.Redis.from_url(broker_url)
    digest = publish(broker_url, info("pi1"))
    db.flushdb()
    assert publish(broker_url, info("pi1", in_flight=2), stored=digest) == digest
    (state,) = read_cluster(db).nodes
    assert state.info.model_names() == {"m1", "m2"}
    assert state.info.in_flight == 2


def test_forgetting_a_node_drops_all_it_stored(broker_url: str) -> None:
    db = redis.Redis.from_url(broker_url)
    publish(broker_url, info("pi1"))
    publish(broker_url, info("pi2"))
    assert forget_node(db, "pi1")
    assert [n.name for n in read_cluster(db).nodes] == ["pi2"]
    assert not db.hexists(names.NODE_LOADS_HASH, "pi1")
    assert not db.hexists(names.NODE_DIGESTS_HASH, "pi1")


def test_a_heartbeat_from_a_newer_worker_with_fields_it_does_not_know_is_still_read(
    broker_url: str,
) -> None:
    """A rolling upgrade may update a worker before its controllers: its heartbeat grows a
    field, and the node must still be listed and routed to, not dropped as unreadable."""
    db = redis.Redis.from_url(broker_url)
    publish(broker_url, info("newer", in_flight=1))
    whole = json.loads(db.hget(names.NODES_HASH, "newer") or b"")
    whole["solar_powered"] = True
    whole["backends"][0]["energy_wh"] = 1.5
    whole["backends"][0]["models"][0]["licence"] = "apache-2.0"
    whole["backends"][0]["counters"]["tokens_in"] = 9
    load = json.loads(db.hget(names.NODE_LOADS_HASH, "newer") or b"")
    load["battery"] = 0.8
    load["backends"][0]["queue_depth"] = 2
    db.hset(names.NODES_HASH, "newer", json.dumps(whole))
    db.hset(names.NODE_LOADS_HASH, "newer", json.dumps(load))
    (state,) = read_cluster(db).nodes
    assert state.name == "newer" and state.info.model_names() == {"m1", "m2"}
    assert state.info.backends[0].in_flight == 1


def test_a_large_fleets_inventories_are_kept_out_of_full_collections_once(
    broker_url: str,
) -> None:
    db = redis.Redis.from_url(broker_url)

    async def publish_fleet(prefix: str, count: int) -> None:
        client = Redis.from_url(broker_url)
        try:
            for n in range(count):
                await publish_node_info(client, info(f"{prefix}{n:03d}"), stored=None)
        finally:
            await client.aclose()

    reader = ClusterReader()
    asyncio.run(publish_fleet("pi", 3))
    frozen = gc.get_freeze_count()
    try:
        reader.read(db)
        assert gc.get_freeze_count() == frozen  # a small cluster: the collector as it was
        asyncio.run(publish_fleet("gpu", FREEZE_AFTER_PARSING))
        view = reader.read(db)
        assert len(view.nodes) == 3 + FREEZE_AFTER_PARSING
        settled = gc.get_freeze_count()
        assert settled > frozen
        reader.read(db)  # nothing parsed again: nothing frozen again
        assert gc.get_freeze_count() <= settled  # (the last view's freed by refcount)
    finally:
        gc.unfreeze()
