"""``python -m controller.gateway [--host H] [--port P]`` (what ``corral serve`` runs)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

import uvicorn

from broker.errors import CorralError
from broker.settings import build_settings
from controller.gateway.app import build_app
from controller.gateway.service import DEFAULT_MAX_BODY_BYTES

KEYS_VARIABLE = "CORRAL_API_KEYS"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_keys() -> list[str]:
    return [k.strip() for k in os.environ.get(KEYS_VARIABLE, "").split(",") if k.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="corral serve",
        description="Serve the cluster over OpenAI- and Ollama-compatible HTTP APIs.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11435, help="port (default 11435)")
    parser.add_argument("--broker", metavar="URL", help="Redis URL (default: CORRAL_BROKER_URL)")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body accepted (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    keys = api_keys()
    if not keys and not is_loopback(args.host):
        print(
            f"corral serve: binding {args.host} (not loopback) needs API keys: set {KEYS_VARIABLE}"
            " to one or more comma-separated keys (clients send Authorization: Bearer KEY)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = build_settings(broker_url=args.broker)
    except CorralError as exc:
        print(f"corral serve: {exc}", file=sys.stderr)
        return 2
    app = build_app(settings, api_keys=keys, max_body_bytes=args.max_body_bytes)
    print(
        f"corral gateway on http://{args.host}:{args.port} (OpenAI: /v1, Ollama: /api)"
        f"{', API keys required' if keys else ''}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
