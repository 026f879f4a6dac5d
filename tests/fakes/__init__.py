"""Fakes of the servers corral talks to, for the tests to start on loopback.

Each fake is an ASGI app; ``serve_in_thread`` runs one with uvicorn in a background thread on a
free 127.0.0.1 port (the way httpx tests its own client), so adapters are exercised over real
TCP: connection refused, dropped connections and client disconnects all behave as in life.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 10.0


class DropConnection(Exception):
    """Raised inside a fake's response stream to cut the TCP connection mid-body.

    uvicorn answers an exception after the response has started by closing the transport
    without the final chunk, which the client sees as a connection dropped mid-stream.
    """


class _HideDrops(logging.Filter):
    """Keep uvicorn from logging a traceback for every connection a test drops on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DropConnection)


@contextmanager
def serve_in_thread(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` on ``127.0.0.1`` at a free port; yield its base URL; stop it on exit."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,  # the kernel picks a free port; we read it back from the listening socket
        loop="asyncio",
        http="h11",
        ws="none",
        lifespan="off",
        log_config=None,  # leave the test process's logging configuration alone
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-server", daemon=True)
    drops = _HideDrops()
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(drops)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake server did not start")
            time.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT_S)
        uvicorn_logger.removeFilter(drops)
