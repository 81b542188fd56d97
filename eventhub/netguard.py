"""The outbound URL guard: every URL a user hands us passes here before we call it.

Only http(s). Link-local addresses (which include the cloud metadata services),
multicast, unspecified and reserved addresses and the well-known metadata host names are
refused by default. An allow list of host patterns (`*.example.com`) and CIDRs narrows
it further: with one set, a destination must match it. `GuardedResolver` applies the same
rules to every address a name resolves to when the connection is made, so a name that
later resolves somewhere else (DNS rebinding) still cannot reach a refused address.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"})
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)


class RefusedDestination(ValueError):
    """A URL the guard will not let us call; the message says why."""


class OutboundGuard:
    def __init__(self, allow: Iterable[str] = (), allow_setting: str = "EVENTHUB_EXPORT_ALLOW") -> None:
        self.allow_setting = allow_setting
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.patterns: list[str] = []
        for item in allow:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.patterns.append(item.lower())

    @property
    def narrowed(self) -> bool:
        return bool(self.networks or self.patterns)

    def check_url(self, url: str) -> str:
        """The URL's host when it may be called without resolving; raises RefusedDestination."""
        try:
            parts = urlsplit(url)
            parts.port  # raises on a bad port
        except ValueError:
            raise RefusedDestination(f"not a valid URL: {url!r}") from None
        if parts.scheme not in ("http", "https"):
            raise RefusedDestination(f"only http and https destinations are allowed, not {parts.scheme or 'none'!r}")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise RefusedDestination("the destination URL has no host")
        if parts.username or parts.password:
            raise RefusedDestination("credentials in the destination URL are not allowed")
        if host in _METADATA_HOSTS:
            raise RefusedDestination(f"{host} is a cloud metadata service")
        try:
            address: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            self.check_address(address)
        elif self.narrowed and not self._host_allowed(host) and not self.networks:
            raise RefusedDestination(f"{host} is not in {self.allow_setting}")
        return host

    def _host_allowed(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, p) for p in self.patterns)

    def check_address(self, address: IPAddress, host: str | None = None) -> None:
        """Raise RefusedDestination unless a connection to `address` is allowed."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address in _METADATA_ADDRESSES:
            raise RefusedDestination(f"{address} is a cloud metadata address")
        if address.is_link_local:
            raise RefusedDestination(f"{address} is a link-local address")
        if address.is_multicast or address.is_unspecified or address.is_reserved:
            raise RefusedDestination(f"{address} cannot be a destination")
        if self.narrowed:
            by_network = any(address in n for n in self.networks)
            by_name = host is not None and self._host_allowed(host)
            if not (by_network or by_name):
                raise RefusedDestination(f"{host or address} is not in {self.allow_setting}")

    async def check_resolved(self, url: str) -> None:
        """`check_url`, and every address the host resolves to."""
        host = self.check_url(url)
        try:
            ipaddress.ip_address(host)
            return
        except ValueError:
            pass
        port = urlsplit(url).port or (443 if url.startswith("https") else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RefusedDestination(f"cannot resolve {host}: {exc.strerror or exc}") from None
        for info in infos:
            self.check_address(ipaddress.ip_address(info[4][0]), host)


class GuardedResolver(AbstractResolver):
    """Resolves through aiohttp's default resolver and drops refused addresses."""

    def __init__(self, guard: OutboundGuard) -> None:
        self.guard = guard
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        reasons: list[str] = []
        for r in results:
            try:
                self.guard.check_address(ipaddress.ip_address(r["host"]), host)
            except RefusedDestination as exc:
                reasons.append(str(exc))
            else:
                allowed.append(r)
        if not allowed:
            raise OSError(f"outbound guard refused {host}: {'; '.join(reasons) or 'no address'}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()

