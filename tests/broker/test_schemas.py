from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.schemas import (
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    JobAssignment,
    JobResult,
    JobSpec,
    NodeInfo,
    Timings,
    parse_event,
)


def spec(**overrides: object) -> JobSpec:
    fields: dict[str, object] = {
        "job_id": "abcdef0123456789",
        "messages": [{"role": "user", "content": "a secret prompt"}],
        "created_at": 1.0,
    }
    fields.update(overrides)
    return JobSpec.model_validate(fields)


def test_job_spec_round_trips_through_json() -> None:
    original = spec(tags=["code", "gpu"], model="llama3.1:8b", node="pi2")
    again = JobSpec.model_validate(original.model_dump(mode="json"))
    assert again == original
    assert again.tags == frozenset({"code", "gpu"})


@pytest.mark.parametrize(
    "overrides",
    [
        {"unexpected": 1},
        {"messages": []},
        {"job_id": "short"},
        {"node": "bad name"},
        {"priority": "urgent"},
        {"v": 1},  # the old schema, where the pinned node was called "route"
    ],
)
def test_malformed_specs_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**overrides)


def test_argsrepr_names_the_job_not_the_prompt() -> None:
    assignment = JobAssignment(spec=spec(node="pi2"), node="pi2", backend="ollama", model="m")
    text = assignment.argsrepr()
    assert text == "job=abcdef0123456789 node=pi2 model=m attempt=1"
    assert "secret" not in text


def test_events_parse_by_their_type() -> None:
    delta = DeltaEvent(job_id="j", seq=3, ts=0, text="hi")
    assert parse_event(delta.model_dump_json()) == delta
    error = ErrorEvent(job_id="j", seq=4, ts=0, code="backend_unavailable", message="down")
    assert isinstance(parse_event(error.model_dump_json()), ErrorEvent)
    result = JobResult(
        job_id="j",
        status="ok",
        node="n",
        backend="b",
        model="m",
        text="hi",
        timings=Timings(queued_ms=1, first_token_ms=2, total_ms=3),
    )
    done = DoneEvent(job_id="j", seq=5, ts=0, result=result)
    assert parse_event(done.model_dump_json()).result.text == "hi"  # type: ignore[union-attr]


def test_an_event_of_unknown_type_is_refused() -> None:
    with pytest.raises(ValidationError):
        parse_event('{"type": "surprise", "job_id": "j", "seq": 0, "ts": 0}')
    with pytest.raises(ValidationError):
        parse_event(b"not json")


def test_messages_are_frozen() -> None:
    message = ChatMessage(role="user", content="x")
    with pytest.raises(ValidationError):
        message.content = "y"  # type: ignore[misc]


def test_the_lua_scripts_write_the_schema_version_the_models_read() -> None:
    from broker.schemas import SCHEMA_VERSION, StartedEvent

    assert (
        StartedEvent.model_fields["v"].default
        == SCHEMA_VERSION
        == JobSpec.model_fields["v"].default
    )


def test_a_job_stays_strict_while_a_heartbeat_ignores_fields_it_does_not_know() -> None:
    """Jobs are inputs: an unknown field is refused. A heartbeat from a newer worker is read."""
    with pytest.raises(ValidationError):
        JobAssignment.model_validate(
            {
                "spec": spec().model_dump(mode="json"),
                "node": "a",
                "backend": "b",
                "model": "m",
                "priority_boost": 1,
            }
        )
    beat = {
        "name": "pi1",
        "version": "9",
        "in_flight": 0,
        "capacity": 1,
        "heartbeat_interval_s": 1,
        "started_at": 0,
        "sent_at": 0,
        "a_new_field": [1],
        "backends": [
            {
                "name": "b",
                "kind": "ollama",
                "healthy": True,
                "capacity": 1,
                "new_backend_field": "x",
                "models": [{"name": "m", "new": 1}],
            }
        ],
    }
    info = NodeInfo.model_validate(beat)
    assert info.model_names() == {"m"} and info.cloud_providers == frozenset()
