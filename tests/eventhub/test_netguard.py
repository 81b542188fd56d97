"""The outbound URL guard: schemes, metadata and link-local addresses, allow lists, resolution."""

from __future__ import annotations

import ipaddress

import pytest

from eventhub.netguard import GuardedResolver, OutboundGuard, RefusedDestination


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://169.254.1.1/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://[::ffff:169.254.169.254]/",
        "http://user:pw@example.com/",
        "http:///nohost",
        "http://example.com:99999/",
    ],
)
def test_refused_by_default(url: str) -> None:
    with pytest.raises(RefusedDestination):
        OutboundGuard().check_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/in", "https://example.com/hook", "http://10.1.2.3/"])
def test_allowed_by_default(url: str) -> None:
    OutboundGuard().check_url(url)


def test_allow_list_narrows() -> None:
    guard = OutboundGuard(["*.example.com", "127.0.0.0/8"])
    guard.check_url("https://hooks.example.com/x")
    guard.check_url("http://127.0.0.1:9/x")
    with pytest.raises(RefusedDestination):
        guard.check_url("http://10.0.0.1/")
    with pytest.raises(RefusedDestination):
        guard.check_address(ipaddress.ip_address("10.0.0.1"), "other.org")
    with pytest.raises(RefusedDestination):
        OutboundGuard(["*.example.com"]).check_url("http://evil.org/")


async def test_resolution_is_checked() -> None:
    await OutboundGuard().check_resolved("http://localhost:1/")
    with pytest.raises(RefusedDestination):
        await OutboundGuard(["10.0.0.0/8"]).check_resolved("http://localhost:1/")


async def test_guarded_resolver_drops_refused_addresses() -> None:
    resolver = GuardedResolver(OutboundGuard(["10.0.0.0/8"]))
    try:
        with pytest.raises(OSError, match="outbound guard refused"):
            await resolver.resolve("localhost", 80)
        ok = GuardedResolver(OutboundGuard())
        assert await ok.resolve("localhost", 80)
        await ok.close()
    finally:
        await resolver.close()
