"""Looking for a planted secret everywhere corral writes: every Redis command while a test
runs, every key and value left in Redis, in clear and as kombu's base64 would carry it."""

from __future__ import annotations

import base64
import socket
import threading
from urllib.parse import urlsplit

import redis


class RedisMonitor:
    """Every command Redis executes while it runs (MONITOR), as text: each key and value the
    worker and the CLI write, the task messages on the queues included, however short-lived."""

    def __init__(self, broker_url: str) -> None:
        parts = urlsplit(broker_url)
        self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
        self._sock.sendall(b"MONITOR\r\n")
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self._sock.recv(65536):
            self._chunks.append(chunk)

    def stop(self) -> str:
        """Stop recording (once; later calls change nothing) and return what was seen."""
        if self._sock.fileno() != -1:
            self._sock.shutdown(socket.SHUT_RDWR)
            self._reader.join(5)
            self._sock.close()
        return b"".join(self._chunks).decode(errors="replace")


def encodings_of(secret: str) -> list[str]:
    """The secret as it would read in base64 at any of the three byte alignments (kombu sends
    a task's body base64-encoded): the middle of each encoding, which the bytes around the
    secret cannot change."""
    found = [secret]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret.encode()).decode()
        found.append(encoded[4 if offset else 0 : -4])
    return found


def everything_in_redis(broker_url: str) -> str:
    """Every key and value of the worker's database, as text."""
    client = redis.Redis.from_url(broker_url)
    parts: list[str] = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            value: object
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = kind
            parts.append(f"{key!r} {value!r}")
    finally:
        client.close()
    return "\n".join(parts)
