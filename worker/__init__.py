"""The node agent: a Celery worker on the node's own queue fronting its local LLM backends."""

import worker.lean_imports  # noqa: F401 - first: it decides what httpx and Celery import
from worker.config import BackendSpec, WorkerConfig, build_worker_config
from worker.node import serve

__all__ = ["BackendSpec", "WorkerConfig", "build_worker_config", "serve"]
