"""The SSRF guard: which addresses a request may reach, decided once per connection.

A host is resolved once; every address it resolves to must be public (or inside a network the
service allows), and the connection goes to exactly the address that was judged, so a DNS
answer that changes between the check and the connect (rebinding) cannot slip past. TLS is
still verified against the host name.

"Public" is stricter than :attr:`ipaddress.IPv4Address.is_global`: multicast and reserved
ranges are refused, scoped IPv6 addresses (``fe80::1%eth0``) are refused, and an IPv4 address
carried inside an IPv6 one (mapped ``::ffff:a.b.c.d``, compatible ``::a.b.c.d``, SIIT
``::ffff:0:a.b.c.d``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``,
Teredo) is judged as that IPv4 address.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection

from integrations.errors import PermanentError

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 6145 IPv4-translated
#: Not public although Python may call them global: site-local (deprecated, RFC 3879) and the
#: documentation range of RFC 9637.
_NOT_PUBLIC = (ipaddress.ip_network("fec0::/10"), ipaddress.ip_network("3fff::/20"))
_HINT = (
    "(a service allows it with allow_private_network or allowed_networks; outgoing webhooks "
    "with WEBHOOK_ALLOWED_NETWORKS)"
)


class BlockedAddress(PermanentError):
    """The request's host is, or resolves to, an address it may not reach."""


def embedded_ipv4(ip: Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one carries, when it carries one."""
    if not isinstance(ip, IPv6Address):
        return None
    n = int(ip)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _SIIT or n >> 32 == 0:
        return IPv4Address(n & 0xFFFFFFFF)
    if ip in _NAT64_LOCAL:
        # RFC 6052 2.2, /48 prefix: bits 48-63 and 72-87 (bits 64-71 are the "u" octet).
        return IPv4Address(((n >> 64) & 0xFFFF) << 16 | ((n >> 40) & 0xFFFF))
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public(ip: Address) -> bool:
    """Whether ``ip`` is a unicast address on the public internet."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        return is_public(inner)
    if isinstance(ip, IPv6Address) and (ip.scope_id or ip.is_site_local or any(ip in n for n in _NOT_PUBLIC)):
        return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


def allowed(ip: Address, networks: Sequence[Network] = ()) -> bool:
    """Public, or inside one of ``networks`` (the address or the IPv4 address it carries)."""
    if is_public(ip):
        return True
    if isinstance(ip, IPv6Address) and ip.scope_id:
        return False  # a scoped address names an interface, not a place a network allows
    inner = embedded_ipv4(ip)
    return any(ip in net or (inner is not None and inner in net) for net in networks)


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def resolve(host: str, port: int, networks: Sequence[Network] = ()) -> str:
    """The one address to connect to for ``host``: every address it resolves to must be
    allowed. Raises :class:`BlockedAddress` (permanent) or ``socket.gaierror``."""
    literal = _literal(host)
    if literal is not None:
        if not allowed(literal, networks):
            raise BlockedAddress(f"refused to connect to {host}: not a public address {_HINT}")
        return str(literal)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or not all(allowed(ip, networks) for ip in addresses):
        raise BlockedAddress(f"refused to connect to {host}: it resolves to a non-public address {_HINT}")
    return str(addresses[0])


def check_host(host: str, port: int, networks: Sequence[Network] = ()) -> None:
    """:func:`resolve` for a check ahead of time (an endpoint being added)."""
    resolve(host, port, networks)


class _Guarded:
    """Mixed into urllib3's connections: connect only to the address :func:`resolve` judged."""

    networks: Sequence[Network] = ()
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        try:
            address = resolve(self.host, self.port, self.networks)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e  # type: ignore[arg-type]
        try:
            sock = connection.create_connection(
                (address, self.port),
                self.timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
        except TimeoutError as e:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from e
        except OSError as e:
            raise NewConnectionError(self, f"Failed to establish a new connection: {e}") from e  # type: ignore[arg-type]
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock


def pool_classes(
    networks: Sequence[Network],
    http_pool: type[HTTPConnectionPool] = HTTPConnectionPool,
    https_pool: type[HTTPSConnectionPool] = HTTPSConnectionPool,
) -> dict[str, type[HTTPConnectionPool]]:
    """urllib3 pool classes whose connections are guarded with ``networks`` allowed: urllib3's
    own, or subclasses of the pools given (botocore's, whose connections add 100-continue)."""
    nets = tuple(networks)
    out: dict[str, type[HTTPConnectionPool]] = {}
    for scheme, pool in (("http", http_pool), ("https", https_pool)):
        base: type[HTTPConnection] = pool.ConnectionCls  # type: ignore[assignment]
        conn = type(f"Guarded{base.__name__}", (_Guarded, base), {"networks": nets})
        out[scheme] = type(f"Guarded{pool.__name__}", (pool,), {"ConnectionCls": conn})
    return out
