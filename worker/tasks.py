"""The one Celery task a node runs: thin, it validates and hands over to the runtime."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from celery import Celery
from celery.exceptions import Reject
from pydantic import ValidationError

from broker import names
from broker.schemas import JobAssignment, JobResult, ModelOpRequest, describe_validation_error

log = logging.getLogger(__name__)


class JobHost(Protocol):
    """What the task hands a job to: a node's ``NodeRuntime``, or a simulated fleet's
    (``worker.sim``), which passes it on to the node the assignment names."""

    def run(self, assignment: JobAssignment) -> JobResult | None: ...
    def report_malformed(self, job_id: str, problem: str) -> None: ...
    def report_failure(self, assignment: JobAssignment, problem: str) -> None: ...
    def start_model_op(self, request: ModelOpRequest) -> None: ...


def job_id_of(payload: Any) -> str | None:
    """The job id of a malformed message, when one can be found, to tell its client."""
    if isinstance(payload, dict):
        spec = payload.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("job_id"), str):
            job_id: str = spec["job_id"]
            if 8 <= len(job_id) <= 64 and job_id.replace("-", "").isalnum():
                return job_id
    return None


def register_tasks(app: Celery, runtime: JobHost) -> None:
    # Celery ships no type hints, hence the ignore on its decorator.
    @app.task(  # type: ignore[untyped-decorator]
        name=names.RUN_JOB_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,  # this app only: the closure holds this node's runtime
    )
    def run_job(self: Any, payload: Any = None, *extra_args: Any, **extra_kwargs: Any) -> Any:
        try:
            if extra_args or extra_kwargs:
                raise ValueError("run_job takes exactly one argument, the JobAssignment")
            assignment = JobAssignment.model_validate(payload)
        except (ValidationError, ValueError) as exc:
            problem = (
                describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            )
            log.error("rejected malformed job message %s: %s", self.request.id, problem)
            job_id = job_id_of(payload)
            if job_id is not None:
                runtime.report_malformed(job_id, f"malformed job message: {problem}")
            raise Reject(f"malformed job message: {problem}", requeue=False) from None
        try:
            result = runtime.run(assignment)
        except Exception as exc:
            # Not a backend failure (those end the stream themselves): the worker itself failed,
            # e.g. Redis went away mid-job. Tell the client if we still can, then let Celery
            # record the failure.
            log.exception("job %s failed inside the worker", assignment.spec.job_id)
            runtime.report_failure(assignment, f"worker error: {type(exc).__name__}")
            raise
        if result is None:
            return {"status": "skipped"}
        return {
            "status": result.status,
            "tokens": result.usage.completion_tokens,
            "error": result.error_code,
        }


def register_model_op_task(app: Celery, runtime: JobHost) -> None:
    @app.task(  # type: ignore[untyped-decorator]
        name=names.MODEL_OP_TASK,
        bind=True,
        # The op runs on the node's event loop, so the task is done once it has started.
        acks_late=False,
        shared=False,
    )
    def model_op(self: Any, payload: Any = None) -> Any:
        try:
            request = ModelOpRequest.model_validate(payload)
        except ValidationError as exc:
            problem = describe_validation_error(exc)
            log.error("rejected malformed model operation %s: %s", self.request.id, problem)
            raise Reject(f"malformed model operation: {problem}", requeue=False) from None
        runtime.start_model_op(request)
        return {"status": "started"}
