"""Images a request carries: ``data:`` URLs decoded here, other URLs fetched only if allowed.

The gateway never reaches a URL a request names unless ``gateway_fetch_image_urls`` is on,
and then only a public address: the host is resolved first and every address it resolves to
is checked (loopback, private, link-local, cloud metadata and other non-public ranges are
refused), the connection is pinned to a checked address (so a second lookup cannot swap in
another), redirects are followed by hand and checked the same way, and the body is capped.
Nothing of the URL beyond its host is put into an error message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from controller.gateway.errors import HttpError, bad_request

__all__ = [
    "ImageFetcher",
    "Resolver",
    "forbidden_reason",
    "image_from_data_url",
    "system_resolve",
]

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``; tests swap it to make a public-looking name resolve anywhere."""

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 3
FETCH_TIMEOUT_S = 10.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
"""Cloud metadata services (AWS, ECS, Alibaba, AWS over IPv6): named even where a range
check would already catch them, so the refusal says what they are."""


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def forbidden_reason(address: str) -> str | None:
    """Why the gateway may not connect to ``address``, or None for a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "an unspecified address"  # 0.0.0.0 and :: reach the host itself
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global or ip.is_multicast:
        return "not a public address"
    return None


def image_from_data_url(url: str, where: str) -> str:
    """The base64 payload of ``data:image/...;base64,...``; 400 for anything else."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise bad_request(f"{where}: a data: URL must be data:image/<type>;base64,<data>")
    try:
        binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise bad_request(f"{where}: the data: URL does not hold valid base64") from None
    return payload


@dataclass(frozen=True)
class _Target:
    url: str
    """The URL with its host replaced by the checked address."""
    host_header: str
    server_name: str


@dataclass
class ImageFetcher:
    """Turns an image URL into base64 data, within the policy in the module docstring."""

    enabled: bool = False
    resolve: Resolver = system_resolve
    transport: httpx.AsyncBaseTransport | None = None
    max_bytes: int = MAX_IMAGE_BYTES
    max_redirects: int = MAX_REDIRECTS
    timeout_s: float = FETCH_TIMEOUT_S

    async def image(self, url: str, where: str) -> str:
        """Base64 image data for a ``data:`` URL or, where allowed, an http(s) URL."""
        if url.startswith("data:"):
            return image_from_data_url(url, where)
        if not self.enabled:
            raise bad_request(
                f"{where}: image URLs are not fetched; send a data: URL"
                " (or set gateway_fetch_image_urls)",
                "image_url_not_fetched",
            )
        return base64.b64encode(await self._fetch(url, where)).decode("ascii")

    async def _fetch(self, url: str, where: str) -> bytes:
        async with httpx.AsyncClient(
            transport=self.transport,
            follow_redirects=False,
            trust_env=False,  # a proxy would resolve the name itself, past our checks
            timeout=self.timeout_s,
        ) as client:
            for _hop in range(self.max_redirects + 1):
                target = await self._checked(url, where)
                location = await self._get(client, target, where)
                if isinstance(location, bytes):
                    return location
                url = urljoin(url, location)
        raise bad_request(f"{where}: the image URL redirects more than {self.max_redirects} times")

    async def _checked(self, url: str, where: str) -> _Target:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise bad_request(f"{where}: an image URL must be http(s) or data:")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await self.resolve(host, port)
        except OSError:
            raise bad_request(f"{where}: the image host {host!r} does not resolve") from None
        if not addresses:
            raise bad_request(f"{where}: the image host {host!r} does not resolve")
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                raise bad_request(
                    f"{where}: the image host {host!r} resolves to {reason}; not fetched",
                    "image_url_forbidden",
                )
        pinned = addresses[0]
        literal = f"[{pinned}]" if ":" in pinned else pinned
        netloc = f"{literal}:{port}"
        path = parts.path or "/"
        query = f"?{parts.query}" if parts.query else ""
        host_header = parts.netloc.rsplit("@", 1)[-1]
        return _Target(f"{parts.scheme}://{netloc}{path}{query}", host_header, host)

    async def _get(self, client: httpx.AsyncClient, target: _Target, where: str) -> bytes | str:
        """The image's bytes, or the ``Location`` a redirect points to."""
        # Connect to the checked address; the name goes in Host and in TLS's SNI, so the
        # certificate is still checked against it.
        extensions = {"sni_hostname": target.server_name}
        try:
            async with client.stream(
                "GET", target.url, headers={"Host": target.host_header}, extensions=extensions
            ) as response:
                if response.status_code in _REDIRECTS:
                    location: str = response.headers.get("location", "")
                    if not location:
                        raise bad_request(f"{where}: the image URL redirects nowhere")
                    return location
                if response.status_code != 200:
                    raise bad_request(
                        f"{where}: the image URL answered HTTP {response.status_code}"
                    )
                if not response.headers.get("content-type", "").startswith("image/"):
                    raise bad_request(f"{where}: the image URL did not answer with an image")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise self._too_large(where)
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body.extend(piece)
                    if len(body) > self.max_bytes:
                        raise self._too_large(where)
                return bytes(body)
        except httpx.HTTPError as exc:
            raise bad_request(
                f"{where}: the image could not be fetched ({type(exc).__name__})"
            ) from None

    def _too_large(self, where: str) -> HttpError:
        return HttpError(
            413, f"{where}: the image is over {self.max_bytes} bytes", code="request_too_large"
        )
