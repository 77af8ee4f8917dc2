"""Where a feed may be pushed: subscribers' endpoints and the city platform must be public
addresses, or a subscription would make us POST into our own network (SSRF: the database's
host, a cloud metadata service, an admin port on loopback).

An endpoint is checked when it is set (`check_endpoint`, a clear 422) and again at every
delivery: the sender's connector resolves through `CheckedResolver`, which refuses the name
when any of its addresses is not public, and connects to exactly the addresses it checked, so
a name that resolves to a public address when subscribed and to an internal one later (DNS
rebinding) is refused then. PARKING_FEED_ALLOW_LOOPBACK lets development and tests push to
loopback (their receivers run there); production refuses that setting.
"""

import asyncio
import errno
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from parking.errors import AppError
from parking.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointRefused(AppError):
    def __init__(self, message: str) -> None:
        super().__init__(422, "endpoint_refused", message)


def refusal(address: Address, allow_loopback: bool) -> str | None:
    """Why a feed may not be pushed to `address` (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address"
    # Private ranges, and the other reserved ones (shared 100.64/10, documentation, …).
    if address.is_private or address.is_reserved or not address.is_global:
        return "a private or reserved address"
    return None


def _refuse(host: str, address: str, allow_loopback: bool) -> None:
    why = refusal(ipaddress.ip_address(address.split("%", 1)[0]), allow_loopback)
    if why is not None:
        raise EndpointRefused(f"the endpoint's host {host} is {why} ({address}): not reachable")


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_literal(url: str, allow_loopback: bool) -> None:
    """Refuses a URL whose host is an IP address that is not public (a connector does not
    resolve those, so `CheckedResolver` never sees them)."""
    host = urlsplit(url).hostname or ""
    if _literal(host) is not None:
        _refuse(host, host, allow_loopback)


async def check_endpoint(url: str, allow_loopback: bool) -> None:
    """Refuses an endpoint whose host is, or resolves to, an address that is not public, or
    does not resolve at all (`EndpointRefused`: 422)."""
    host = urlsplit(url).hostname or ""
    if _literal(host) is not None:
        _refuse(host, host, allow_loopback)
        return
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EndpointRefused(f"the endpoint's host {host} does not resolve") from exc
    for *_, sockaddr in found:
        _refuse(host, str(sockaddr[0]), allow_loopback)


class CheckedResolver(AbstractResolver):
    """Resolves as usual, then refuses the name (an OSError: the delivery fails and is retried
    like any unreachable endpoint) when any of its addresses is not public; the connector
    connects to the addresses returned here, the ones checked."""

    def __init__(self, settings: Settings) -> None:
        # Read at each resolution (PARKING_FEED_ALLOW_LOOPBACK as it is now).
        self.settings = settings
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        for result in found:
            try:
                _refuse(host, result["host"], self.settings.feed_allow_loopback)
            except EndpointRefused as exc:
                # errno and strerror: aiohttp shows the latter in the delivery's error.
                raise OSError(errno.EACCES, exc.message) from exc
        return found

    async def close(self) -> None:
        await self._resolver.close()
