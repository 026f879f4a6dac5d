"""``python -m controller.gateway [--host H] [--port P]`` (what ``corral serve`` runs)."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from broker.errors import CorralError
from controller.bearer_auth import api_keys, keys_missing_message
from controller.config_watch import ConfigWatch
from controller.gateway.app import build_app
from controller.gateway.service import DEFAULT_MAX_BODY_BYTES


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
    refusal = keys_missing_message("corral serve", args.host)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    try:
        config = ConfigWatch.from_environment(broker_url=args.broker)
    except CorralError as exc:
        print(f"corral serve: {exc}", file=sys.stderr)
        return 2
    app = build_app(
        config.current(), api_keys=keys, max_body_bytes=args.max_body_bytes, config=config
    )
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
