"""The node agent: a Celery worker on the node's own queue fronting its local LLM backends."""

from worker.config import BackendSpec, WorkerConfig, build_worker_config
from worker.node import serve

__all__ = ["BackendSpec", "WorkerConfig", "build_worker_config", "serve"]
