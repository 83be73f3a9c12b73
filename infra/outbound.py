"""Requests Crucible makes to addresses its users give (webhooks), kept off this machine and its
networks: the server-side request forgery Judge0's callbacks were open to.

An address is refused unless it is global: loopback, private, shared (CGNAT), link-local (the
cloud metadata service at 169.254.169.254 among them), multicast, reserved and unspecified
addresses are refused, and so are IPv6 addresses that carry such an IPv4 address (mapped,
6to4, Teredo, NAT64). A host is read as the C library would read it, so `2130706433`, `0x7f.1`
and `127.1` are 127.0.0.1; a name is resolved and refused if any of its addresses is.

The check runs twice: when the URL is given (a clear 422), and again inside the connection, on
the very addresses it then connects to (`GuardedBackend`), so a name that resolves elsewhere
by then (DNS rebinding) is refused too. Hosts an operator names (`CRUCIBLE_WEBHOOK_ALLOW_HOSTS`,
spelled exactly as in the URL) are not checked.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Resolves a host name to its addresses (as text); the tests give their own.
Resolver = Callable[[str, int], Awaitable[list[str]]]

#: How long resolving a host may take.
RESOLVE_TIMEOUT_S = 5.0
#: IPv4 written as the C library reads it: 1 to 4 parts, decimal, octal or hex.
_NUMERIC_V4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}\.?$", re.IGNORECASE)
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Not global whatever this Python's tables say (they changed between 3.11 releases): the IETF
#: protocol block, site-local IPv6, documentation, benchmarking.
_NEVER = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.0.0/24", "fec0::/10", "2001:db8::/32", "198.18.0.0/15", "240.0.0.0/4")
)
#: Threads of one process's own for resolving webhook hosts: a lookup that hangs holds one of
#: these, never the event loop's shared pool (Redis reconnects, executors' names).
RESOLVER_THREADS = 4


class BlockedAddress(Exception):
    """A URL whose host is, or resolves to, an address Crucible must not reach. Its text is
    for the caller; `detail` (what the name resolved to) for operators' logs only."""

    #: never worth retrying: the same address would be refused again
    retryable = False

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def refusal(address: IPAddress) -> str | None:
    """Why `address` may not be reached (its kind), or None if it is a global one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return refusal(embedded)
    for kind, flag in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                       ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                       ("private", address.is_private)):  # fmt: skip
        if flag:
            return kind
    if any(address in network for network in _NEVER) or getattr(address, "is_site_local", False):
        return "reserved"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared (carrier-grade NAT)"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address `host` spells, read as the C library reads it ("127.1", "0x7f.1",
    "2130706433", "[::1]"), or None if it is a name."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_V4.match(bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare.rstrip(".")))
        except OSError:
            return None
    return None


class SystemResolver:
    """This machine's resolver, on threads of its own (`RESOLVER_THREADS`, made on first use)."""

    def __init__(self, threads: int = RESOLVER_THREADS) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    async def __call__(self, host: str, port: int) -> list[str]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="webhook-dns")
        lookup = functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(self._pool, lookup), RESOLVE_TIMEOUT_S
        )
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressPolicy:
    """Which hosts outbound requests may reach: global addresses, and the operator's hosts."""

    def __init__(self, allowed_hosts: Iterable[str] = (), resolver: Resolver | None = None) -> None:
        self.allowed_hosts = frozenset(h.strip().lower() for h in allowed_hosts if h.strip())
        self.resolver = resolver or SystemResolver()

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for `host`; BlockedAddress if it, or any address it
        resolves to, may not be reached."""
        if host.lower() in self.allowed_hosts:
            literal = literal_address(host)
            return [str(literal)] if literal else await self.resolver(host, port)
        literal = literal_address(host)
        if literal is not None:
            found = [literal]
        else:
            # one answer for a name that does not resolve and one that resolves inside: which
            # it was (and where to) would map the networks behind Crucible; the logs say it
            unreachable = f"host {host!r} does not resolve to public addresses only"
            try:
                found = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await self.resolver(host, port)]
            except (OSError, TimeoutError, ValueError) as exc:
                raise BlockedAddress(unreachable, f"does not resolve: {exc}") from None
            if not found:
                raise BlockedAddress(unreachable, "no address")
        for address in found:
            if kind := refusal(address):
                if literal is None:
                    raise BlockedAddress(unreachable, f"resolves to {address}, a {kind} address")
                spelled = "" if str(address) == host.strip("[]") else f" ({address})"
                raise BlockedAddress(f"host {host!r}{spelled} is a {kind} address")
        return [str(a) for a in found]

    async def check_url(self, url: str) -> None:
        """BlockedAddress if `url`'s host may not be reached now."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await self.addresses(parts.hostname or "", port)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the policy allows, checked
    at connect time (TLS still names the URL's host: httpcore starts it on this stream)."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failure: Exception | None = None
        for address in await self.policy.addresses(host, port):
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not reachable from outbound requests")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a `GuardedBackend`, with no proxy from the environment."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=100,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(policy, inner),
        )


def guarded_client(
    policy: AddressPolicy, timeout_s: float, inner: httpcore.AsyncNetworkBackend | None = None
) -> httpx.AsyncClient:
    """An HTTP client for user-given URLs: guarded addresses, no redirects followed, no proxy,
    every phase bounded by `timeout_s`."""
    return httpx.AsyncClient(
        transport=GuardedTransport(policy, inner), follow_redirects=False, trust_env=False, timeout=timeout_s
    )
