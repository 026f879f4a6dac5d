"""Nobody reaches a URL they name: the gateway's image-URL policy, and no front door that
registers a route.

The gateway runs in its own process (as ``corral serve`` does) in front of a loopback HTTP
server the test runs, which counts every request it gets: a refused image URL must leave it
untouched. The fetcher's checks on names that resolve somewhere they must not, and on
redirects, run with the resolver swapped (a public-looking name cannot be made to resolve to
loopback otherwise) and an ``httpx.MockTransport`` standing in for the network.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.settings import build_settings
from controller.aclient import AsyncCorralClient
from controller.gateway.app import build_app
from controller.gateway.errors import HttpError
from controller.gateway.image_urls import ImageFetcher, forbidden_reason
from controller.mcp.jobs import JobBook
from controller.mcp.server import build_server
from tests.controller.gateway.conftest import Gateway, running_gateway
from tests.fakes import serve_in_thread

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
PUBLIC_IP = "93.184.215.14"


@pytest.fixture(scope="module")
def image_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback server with an image on it; the list records every path it was asked for."""
    seen: list[str] = []

    async def image(request: Request) -> Response:
        seen.append(request.url.path)
        return Response(PNG, media_type="image/png")

    app = Starlette(routes=[Route("/{name:path}", image)])
    with serve_in_thread(app) as url:
        yield url, seen


@pytest.fixture(scope="module")
def default_gateway(module_broker_url: str, module_log_dir: Path) -> Iterator[Gateway]:
    with running_gateway(module_broker_url, module_log_dir) as gw:
        yield gw


@pytest.fixture(scope="module")
def fetching_gateway(module_broker_url: str, module_log_dir: Path) -> Iterator[Gateway]:
    env = {"CORRAL_GATEWAY_FETCH_IMAGE_URLS": "true"}
    with running_gateway(module_broker_url, module_log_dir, env=env) as gw:
        yield gw


def _ask_about(gateway: Gateway, image_url: str) -> None:
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) as client:
        client.chat.completions.create(
            model="any-vision-model",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": image_url}},
                    ],
                }
            ],
        )


def test_by_default_an_image_url_is_refused_and_never_fetched(
    default_gateway: Gateway, image_server: tuple[str, list[str]]
) -> None:
    url, seen = image_server
    with pytest.raises(openai.BadRequestError, match="image URLs are not fetched") as caught:
        _ask_about(default_gateway, f"{url}/cat.png")
    assert "send a data: URL" in caught.value.message
    assert caught.value.code == "image_url_not_fetched"
    assert seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_with_fetching_on_a_loopback_image_url_is_refused_and_never_fetched(
    fetching_gateway: Gateway, image_server: tuple[str, list[str]], host: str
) -> None:
    url, seen = image_server
    port = httpx.URL(url).port
    with pytest.raises(openai.BadRequestError, match="loopback") as caught:
        _ask_about(fetching_gateway, f"http://{host}:{port}/cat.png")
    assert caught.value.code == "image_url_forbidden"
    assert seen == []


# --- the fetcher's policy, with the resolver and the network swapped ----------------------


def _resolver(table: dict[str, list[str]]) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


def _fetch(fetcher: ImageFetcher, url: str) -> str:
    return asyncio.run(fetcher.image(url, "messages[0].content[1]"))


def test_a_public_looking_name_that_resolves_to_loopback_is_refused() -> None:
    requests: list[httpx.Request] = []
    fetcher = ImageFetcher(
        enabled=True,
        resolve=_resolver({"images.example.com": ["127.0.0.1"]}),
        transport=httpx.MockTransport(lambda r: requests.append(r) or httpx.Response(200)),
    )
    with pytest.raises(HttpError, match="resolves to a loopback address"):
        _fetch(fetcher, "http://images.example.com/cat.png")
    assert requests == []


def test_every_resolved_address_is_checked_not_just_the_first() -> None:
    requests: list[httpx.Request] = []
    fetcher = ImageFetcher(
        enabled=True,
        resolve=_resolver({"cdn.example.com": [PUBLIC_IP, "10.0.0.7"]}),
        transport=httpx.MockTransport(lambda r: requests.append(r) or httpx.Response(200)),
    )
    with pytest.raises(HttpError, match="private address"):
        _fetch(fetcher, "https://cdn.example.com/cat.png")
    assert requests == []


def test_a_redirect_to_cloud_metadata_is_refused() -> None:
    requests: list[httpx.Request] = []

    def network(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.host == PUBLIC_IP:
            return httpx.Response(
                302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
            )
        return httpx.Response(
            200, content=b"iam credentials", headers={"Content-Type": "image/png"}
        )

    fetcher = ImageFetcher(
        enabled=True,
        resolve=_resolver({"cdn.example.com": [PUBLIC_IP], "169.254.169.254": ["169.254.169.254"]}),
        transport=httpx.MockTransport(network),
    )
    with pytest.raises(HttpError, match="cloud metadata"):
        _fetch(fetcher, "http://cdn.example.com/cat.png")
    assert [r.url.host for r in requests] == [PUBLIC_IP]


def test_an_allowed_fetch_is_pinned_to_the_checked_address_and_capped() -> None:
    requests: list[httpx.Request] = []

    def network(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"})

    fetcher = ImageFetcher(
        enabled=True,
        resolve=_resolver({"cdn.example.com": [PUBLIC_IP]}),
        transport=httpx.MockTransport(network),
    )
    assert base64.b64decode(_fetch(fetcher, "https://cdn.example.com/a/cat.png?v=2")) == PNG
    (sent,) = requests
    assert sent.url.host == PUBLIC_IP  # no second lookup can swap the address
    assert sent.url.path == "/a/cat.png" and sent.url.query == b"v=2"
    assert sent.headers["host"] == "cdn.example.com"
    assert sent.extensions["sni_hostname"] == "cdn.example.com"  # TLS still checks the name

    small = ImageFetcher(
        enabled=True,
        resolve=_resolver({"cdn.example.com": [PUBLIC_IP]}),
        transport=httpx.MockTransport(network),
        max_bytes=len(PNG) - 1,
    )
    with pytest.raises(HttpError, match="over") as caught:
        _fetch(small, "https://cdn.example.com/cat.png")
    assert caught.value.status == 413


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("fe80::1", "a link-local address"),
        ("192.168.1.20", "a private address"),
        ("100.64.0.1", "not a public address"),
        ("0.0.0.0", "an unspecified address"),
        (PUBLIC_IP, None),
    ],
)
def test_which_addresses_are_off_limits(address: str, reason: str | None) -> None:
    assert forbidden_reason(address) == reason


# --- no front door registers a route ----------------------------------------------------

_GATEWAY_WRITES = {
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/v1/embeddings",
    "/embeddings",
    "/api/chat",
    "/api/generate",
    "/api/show",
    "/api/embed",
    "/api/embeddings",
}


def test_the_gateway_offers_no_way_to_register_a_route(module_broker_url: str) -> None:
    """Routes (a named URL and key a node may call) are written only with the controller's
    credentials (``corral route add``): every POST the gateway takes is a generation, a model
    lookup or an embedding, none of which writes a route."""
    app = build_app(build_settings(broker_url=module_broker_url))
    starlette_app = app.app  # type: ignore[attr-defined]
    paths = {
        route.path: route.methods or set()
        for route in starlette_app.routes
        if isinstance(route, Route)
    }
    writes = {path for path, methods in paths.items() if methods - {"GET", "HEAD"}}
    assert writes == _GATEWAY_WRITES
    assert not [path for path in paths if "route" in path.lower()]


def test_the_mcp_server_offers_no_tool_that_registers_a_route_or_takes_a_url(
    module_broker_url: str,
) -> None:
    async def listed() -> list[Any]:
        client = AsyncCorralClient(build_settings(broker_url=module_broker_url))
        try:
            server = build_server(client, JobBook(client), [])
            return list(await server.list_tools())
        finally:
            await client.aclose()

    tools = asyncio.run(listed())
    assert {t.name for t in tools} >= {"ask", "list_models"}
    for tool in tools:
        assert "route" not in tool.name.lower()
        schema = tool.model_dump(by_alias=True).get("inputSchema") or {}
        fields = set(schema.get("properties", {}))
        if tool.name == "ask":
            assert "prompt" in fields  # the schema was really read
        assert not {f for f in fields if "url" in f.lower() or "endpoint" in f.lower()}, tool.name
