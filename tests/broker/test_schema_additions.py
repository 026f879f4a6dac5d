"""The fields added for tools, images and reasoning stay out of the JSON while unused, so a
plain chat's messages are what a reader that predates them (``extra="forbid"``) accepts, and a
token's Redis write does not grow."""

from __future__ import annotations

import json

from broker.nodeload import NodeLoad, inventory_digest, load_of, with_load
from broker.schemas import (
    BackendInfo,
    ChatMessage,
    DeltaEvent,
    JobSpec,
    ModelInfo,
    NodeInfo,
    ToolCall,
    ToolDefinition,
    ToolFunction,
    parse_event,
)

ADDED = {"images", "tool_calls", "tool_call_id", "name", "tools", "think", "reasoning"}


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_a_plain_chat_carries_none_of_the_added_fields() -> None:
    spec = JobSpec(
        job_id="job-12345678", messages=(ChatMessage(role="user", content="hi"),), created_at=1.0
    )
    delta = DeltaEvent(job_id="job-12345678", seq=3, ts=1.0, text=" hi")
    assert not _keys(spec.model_dump(mode="json")) & ADDED
    assert json.loads(delta.model_dump_json()) == {
        "v": 2,
        "job_id": "job-12345678",
        "seq": 3,
        "ts": 1.0,
        "type": "delta",
        "text": " hi",
    }


def test_a_tool_call_delta_round_trips_with_its_arguments_an_object() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris", "days": [1, 2]})
    delta = DeltaEvent(
        job_id="job-12345678", seq=4, ts=1.0, text="", reasoning="hmm", tool_calls=(call,)
    )
    wire = json.loads(delta.model_dump_json())
    assert wire["tool_calls"][0]["arguments"] == {"city": "Paris", "days": [1, 2]}
    assert parse_event(delta.model_dump_json()) == delta
    tool = ToolDefinition(function=ToolFunction(name="get_weather"))
    spec = JobSpec(
        job_id="job-12345678",
        messages=(ChatMessage(role="assistant", content="", tool_calls=(call,)),),
        created_at=1.0,
        tools=(tool,),
    )
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_a_local_backends_heartbeat_and_load_carry_no_quota_share() -> None:
    backend = BackendInfo(
        name="ollama", kind="ollama", healthy=True, capacity=1, models=(ModelInfo(name="m"),)
    )
    info = NodeInfo(
        name="pi",
        version="test",
        backends=(backend,),
        in_flight=0,
        capacity=1,
        heartbeat_interval_s=2,
        started_at=0,
        sent_at=0,
    )
    load = load_of(info, inventory_digest(info))
    assert "quota_left" not in _keys(json.loads(info.model_dump_json()))
    assert "quota_left" not in _keys(json.loads(load.model_dump_json()))
    # A cloud backend's share goes with the load, and back into the NodeInfo read from it.
    cloud = info.model_copy(update={"backends": (backend.model_copy(update={"quota_left": 0.4}),)})
    cloud_load = NodeLoad.model_validate_json(
        load_of(cloud, inventory_digest(cloud)).model_dump_json()
    )
    assert inventory_digest(cloud) == inventory_digest(info)
    assert with_load(info, cloud_load).backends[0].quota_left == 0.4
