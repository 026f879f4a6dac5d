"""Bearer-token auth for corral's HTTP front doors (the gateway, MCP over HTTP).

Keys come from ``CORRAL_API_KEYS`` (comma-separated, several allowed, read from the
environment only: never from corral.yaml, never logged). A loopback bind may run without
keys; any other bind must have them (``require_keys_off_loopback``). Each front door
answers a refusal in its own API's shape, so the middleware takes a ``refuse`` factory.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Collection, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

KEYS_VARIABLE = "CORRAL_API_KEYS"
CHALLENGE = 'Bearer realm="corral"'
"""The ``WWW-Authenticate`` value of every 401."""


def api_keys(environ: dict[str, str] | None = None) -> list[str]:
    """The keys in ``CORRAL_API_KEYS`` (blank entries dropped)."""
    raw = (os.environ if environ is None else environ).get(KEYS_VARIABLE, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name or "" (every interface): treat as reachable from outside


def keys_missing_message(program: str, host: str) -> str | None:
    """Why ``program`` may not bind ``host`` with no keys set, or None when it may."""
    if is_loopback(host) or api_keys():
        return None
    return (
        f"{program}: binding {host} (not loopback) needs API keys: set {KEYS_VARIABLE} to one"
        " or more comma-separated keys (clients send Authorization: Bearer KEY)"
    )


def key_matches(given: bytes, keys: Sequence[bytes]) -> bool:
    """Constant time: compare with every key, always, so the time taken says nothing about
    which key is close or how many there are before the matching one."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def bearer_token(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return bytes(value[7:].strip())
    return b""


class RequireBearer:
    """ASGI middleware: HTTP requests need ``Authorization: Bearer KEY`` with one of ``keys``
    (none given: everything passes). ``refuse(scope)`` makes the 401 response; it must carry
    ``WWW-Authenticate: CHALLENGE``."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        refuse: Callable[[Scope], ASGIApp],
        *,
        open_paths: Collection[str] = (),
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]
        self.refuse = refuse
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or scope["path"] in self.open_paths
            or key_matches(bearer_token(scope), self.keys)
        ):
            await self.app(scope, receive, send)
            return
        await self.refuse(scope)(scope, receive, send)


__all__ = [
    "CHALLENGE",
    "KEYS_VARIABLE",
    "RequireBearer",
    "api_keys",
    "bearer_token",
    "is_loopback",
    "key_matches",
    "keys_missing_message",
]
