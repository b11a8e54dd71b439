"""SSRF-safe webhook URLs and delivery (``../shared/DESIGN.md`` §8, issue 5 item 4).

Two layers, both needed:

* :func:`check_url` runs when an endpoint is created or updated. It parses the URL strictly,
  normalises every spelling of an IP literal (``2130706433``, ``0177.0.0.1``, ``0x7f.1``,
  ``127.1``, ``[::ffff:7f00:1]``, NAT64 / 6to4 / IPv4-compatible embeddings, zone ids, trailing
  dots) and resolves host names once (all address families). The URL is refused with
  :class:`UnsafeURL` (a ``ValueError`` whose message says what is wrong, for a 400 answer) when
  any address is not a public unicast address.
* :class:`SafeWebhookClient` runs in the Celery workers. It checks and resolves the URL again at
  delivery time (the DNS answer may have changed since creation: DNS rebinding), then *pins*
  the connection to the checked address: the request is sent to the IP literal with the
  original ``Host`` header and, for https, the original name as TLS SNI and certificate name.
  Redirects are never followed, the whole attempt is bounded by a deadline (15 s by default)
  and at most ``max_response_bytes`` of the answer are read.

Decisions:

* A host name that does not resolve is **refused at creation** ("could not be resolved"). An
  endpoint that cannot be reached now is almost always a typo, and accepting it would let a
  name that later resolves to an internal address skip the creation-time check (delivery
  re-checks anyway). ``check_url(..., resolve=False)`` skips resolution for callers that only
  want the syntactic and IP-literal checks.
* Refused addresses: everything that is not a public unicast address. Concretely: Python's
  ``not ip.is_global`` plus explicit tables (the standard library of Python 3.11 considers
  multicast, NAT64, 6to4 and a few others "global"): loopback, private (RFC 1918, ULA),
  link-local, multicast, unspecified, reserved, broadcast, shared/CGNAT ``100.64.0.0/10``,
  benchmarking, documentation, IETF protocol assignments, IPv6 outside ``2000::/3``, and the
  cloud metadata addresses (``169.254.169.254``, ``169.254.170.2``, ``fd00:ec2::254``,
  ``100.100.100.200``, ``168.63.129.16``, ``192.0.0.192``). IPv6 addresses that embed an IPv4
  address (IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64 ``64:ff9b::/96``, 6to4
  ``2002::/16``) are judged by the embedded address as well.
* A URL that points at several addresses is refused when *any* of them is unsafe.
* Only ``https`` is accepted; ``http`` only for allow-listed hosts. No user info
  (``user:pass@``), no backslashes, no whitespace or control characters, no non-ASCII outside
  the host name, at most 2048 characters both as given and once normalised (the normalised URL
  is what is stored), explicit ports 1-65535. A fragment is dropped (it is never sent). IDNA
  host names are converted to their ASCII (``xn--``) form.
* The allow list (``LORAPLEX_WEBHOOK_ALLOW_HOSTS``, see :func:`parse_allow_hosts`) names host
  names or IP literals. It matches the URL's *host* only (after normalisation, so an allowed
  ``127.0.0.1`` also matches ``0x7f.1``); an allowed host skips the address checks and may use
  ``http``. A host name is not allowed merely because it resolves to an allowed IP.
* The stored URL (:attr:`CheckedURL.url`) is the normalised one (lower-case scheme and host,
  canonical IP literal, default port omitted, fragment dropped).
* Name resolution uses the system resolver (``socket.getaddrinfo``), which has no timeout of
  its own: each lookup runs on a small shared pool of threads and is given up after
  ``RESOLVE_TIMEOUT_SECONDS`` (the name then counts as not resolved), so a name server that
  never answers cannot hold API requests or sender threads. The delivery deadline starts after
  it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_TIMEOUT_S",
    "MAX_URL_LENGTH",
    "CheckedURL",
    "DeliveryResult",
    "SafeWebhookClient",
    "UnsafeURL",
    "check_url",
    "normalize_host",
    "parse_allow_hosts",
    "unsafe_address_reason",
]

MAX_URL_LENGTH = 2048
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_MAX_RESPONSE_BYTES = 4096
_DEFAULT_PORTS = {"https": 443, "http": 80}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURL(ValueError):
    """A webhook URL that must not be used; ``str(exc)`` says why, in words for the tenant."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"webhook URL refused: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed :func:`check_url`, split into what the client needs to pin it."""

    url: str  # normalised URL (what to store)
    scheme: str  # "https" or "http"
    host: str  # normalised: lower case, ASCII (IDNA), no trailing dot, IPs unbracketed
    port: int
    path_and_query: str  # "/path?query", never empty
    addresses: list[str] = field(default_factory=list)  # checked IPs, in resolver order
    allow_listed: bool = False

    @property
    def host_header(self) -> str:
        """``Host`` header value: the original host, with the port unless it is the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    @property
    def is_ip_literal(self) -> bool:
        return _parse_ip(self.host) is not None


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery attempt did. ``error`` is ``None`` exactly when ``ok`` is true."""

    status_code: int | None
    duration_ms: float
    response_excerpt: str
    error: str | None
    ok: bool
    address: str | None = None  # the IP the request was sent to, when a connection was made


# --- address classification ------------------------------------------------------------------

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

_METADATA_ADDRESSES: dict[IPAddress, str] = {
    ipaddress.ip_address("169.254.169.254"): "AWS/GCP/Azure/OpenStack",
    ipaddress.ip_address("169.254.170.2"): "AWS ECS",
    ipaddress.ip_address("fd00:ec2::254"): "AWS IPv6",
    ipaddress.ip_address("100.100.100.200"): "Alibaba Cloud",
    ipaddress.ip_address("168.63.129.16"): "Azure WireServer",
    ipaddress.ip_address("192.0.0.192"): "Oracle Cloud",
}

# Order matters: the first match names the reason.
_BLOCKED_V4: list[tuple[ipaddress.IPv4Network, str]] = [
    (_V4("255.255.255.255/32"), "the broadcast address"),
    (_V4("0.0.0.0/8"), "an unspecified ('this network') address"),
    (_V4("127.0.0.0/8"), "a loopback address"),
    (_V4("10.0.0.0/8"), "a private address"),
    (_V4("172.16.0.0/12"), "a private address"),
    (_V4("192.168.0.0/16"), "a private address"),
    (_V4("169.254.0.0/16"), "a link-local address"),
    (_V4("100.64.0.0/10"), "a shared (carrier-grade NAT) address"),
    (_V4("192.0.0.0/24"), "an IETF protocol assignment address"),
    (_V4("192.0.2.0/24"), "a documentation address"),
    (_V4("198.51.100.0/24"), "a documentation address"),
    (_V4("203.0.113.0/24"), "a documentation address"),
    (_V4("198.18.0.0/15"), "a benchmarking address"),
    (_V4("192.88.99.0/24"), "a reserved (6to4 relay anycast) address"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("240.0.0.0/4"), "a reserved address"),
]

_BLOCKED_V6: list[tuple[ipaddress.IPv6Network, str]] = [
    (_V6("::/128"), "an unspecified address"),
    (_V6("::1/128"), "a loopback address"),
    (_V6("::/96"), "a deprecated IPv4-compatible address"),
    (_V6("::ffff:0:0:0/96"), "an IPv4-translated address"),
    (_V6("64:ff9b:1::/48"), "a local-use NAT64 address"),
    (_V6("100::/64"), "a discard-only address"),
    (_V6("2001:db8::/32"), "a documentation address"),
    (_V6("3fff::/20"), "a documentation address"),
    (_V6("2001::/23"), "an IETF protocol assignment address (Teredo, ORCHID, ...)"),
    (_V6("5f00::/16"), "a reserved (SRv6) address"),
    (_V6("fc00::/7"), "a private (unique local) address"),
    (_V6("fe80::/10"), "a link-local address"),
    (_V6("fec0::/10"), "a deprecated site-local address"),
    (_V6("ff00::/8"), "a multicast address"),
]
_GLOBAL_UNICAST_V6 = _V6("2000::/3")
_NAT64 = _V6("64:ff9b::/96")


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address stands for, with the name of the embedding."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped IPv6 address", ip.ipv4_mapped
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "a NAT64 address", low32
    if ip.sixtofour is not None:
        return "a 6to4 address", ip.sixtofour
    if ip in _V6("::ffff:0:0:0/96"):
        return "an IPv4-translated address", low32
    if ip in _V6("::/96") and int(ip) > 1:
        return "an IPv4-compatible address", low32
    return None


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    if ip in _METADATA_ADDRESSES:
        return f"a cloud metadata address ({_METADATA_ADDRESSES[ip]})"
    for network, reason in _BLOCKED_V4:
        if ip in network:
            return reason
    if ip.is_multicast:
        return "a multicast address"
    if not ip.is_global:
        return "a non-public (reserved) address"
    return None


def unsafe_address_reason(ip: IPAddress) -> str | None:
    """Why a webhook may not be sent to ``ip`` (e.g. ``"a loopback address"``), or ``None``.

    For IPv6 addresses embedding an IPv4 address the reason names the embedded address.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_reason(ip)
    if ip.scope_id:
        ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
    if ip in _METADATA_ADDRESSES:
        return f"a cloud metadata address ({_METADATA_ADDRESSES[ip]})"
    embedded = _embedded_v4(ip)
    if embedded is not None:
        kind, v4 = embedded
        v4_reason = _v4_reason(v4)
        if v4_reason is not None:
            return f"{kind} embedding {v4}, {v4_reason}"
        if ip.ipv4_mapped is not None or ip in _NAT64 or ip.sixtofour is not None:
            return None  # a public IPv4 address behind a usable embedding
    for network, reason in _BLOCKED_V6:
        if ip in network:
            return reason
    if ip not in _GLOBAL_UNICAST_V6:
        return "a reserved address (outside 2000::/3)"
    if ip.is_multicast:
        return "a multicast address"
    if not ip.is_global:
        return "a non-public (reserved) address"
    return None


def _connect_address(ip: IPAddress) -> IPAddress:
    """IPv4-mapped addresses are connected to as the IPv4 address they stand for."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# --- host parsing ------------------------------------------------------------------------------

_HOSTNAME_CHARS = re.compile(r"[a-z0-9._-]+")
_IPV4_PART = re.compile(r"0[x][0-9a-f]*|[0-9]+")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_PORT = re.compile(r"[0-9]{1,5}")


class _HostError(ValueError):
    pass


def _parse_ipv4_number(part: str) -> int:
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if not part.isdigit() or "8" in part or "9" in part:
            raise _HostError(f"{part!r} is not a valid octal number")
        return int(part, 8)
    return int(part, 10)


def _parse_ipv4_whatwg(host: str) -> ipaddress.IPv4Address | None:
    """The WHATWG (browser / ``inet_aton``) IPv4 parser: ``127.1``, ``0x7f.1``, ``2130706433``...

    Returns ``None`` when ``host`` is a domain name, raises ``_HostError`` for a host that ends
    in a number but is not a valid IPv4 address (``1.2.3.4.5``, ``256.0.0.1``).
    """
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]
    if not _IPV4_PART.fullmatch(parts[-1]):
        return None
    if len(parts) > 4 or any(not _IPV4_PART.fullmatch(p) for p in parts):
        raise _HostError(f"{host!r} is not a valid IPv4 address")
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise _HostError(f"{host!r} is not a valid IPv4 address (a part is out of range)")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalize_host(raw: str) -> tuple[str, IPAddress | None]:
    """Normalise a URL host: ``(host, ip)``; ``ip`` is set when the host is an IP literal.

    Accepts ``[v6]`` (optionally with a ``%25zone``), any IPv4 spelling, and host names
    (lower-cased, IDNA-encoded, one trailing dot removed). Raises ``ValueError`` when invalid.
    """
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise _HostError(f"{raw!r} is not a valid IPv6 literal")
        inner = raw[1:-1]
        zone = ""
        if "%" in inner:
            inner, _, zone = inner.partition("%")
            zone = zone.removeprefix("25")
        try:
            v6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise _HostError(f"{raw!r} is not a valid IPv6 address") from None
        if zone:
            reason = unsafe_address_reason(v6)
            detail = f" ({v6} is {reason})" if reason else ""
            raise _HostError(f"{raw!r} has an IPv6 zone id; zone ids are not allowed{detail}")
        return v6.compressed, v6
    host = raw.lower()
    if not host.isascii():
        try:
            host = httpx.URL(scheme="https", host=host).raw_host.decode("ascii")
        except (httpx.InvalidURL, UnicodeError):
            raise _HostError(f"{raw!r} is not a valid internationalised host name") from None
    if not _HOSTNAME_CHARS.fullmatch(host):
        raise _HostError(f"{raw!r} is not a valid host name")
    v4 = _parse_ipv4_whatwg(host)
    if v4 is not None:
        return str(v4), v4
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    if len(host) > 253 or any(not label or len(label) > 63 for label in labels):
        raise _HostError(f"{raw!r} is not a valid host name")
    return host, None


def parse_allow_hosts(value: str | Iterable[str], *, strict: bool = True) -> frozenset[str]:
    """Normalise an allow list: ``"127.0.0.1, localhost"`` or an iterable of hosts.

    Entries are host names or IP literals (IPv6 with or without brackets). Invalid entries raise
    ``ValueError`` (so that a misconfigured setting can fail at start-up); with ``strict`` false
    they are kept lower-cased as given (they can then only match an identical host), which is
    what :func:`check_url` and :class:`SafeWebhookClient` do so that they never raise for them.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    out: set[str] = set()
    for item in items:
        entry = item.strip()
        if not entry:
            continue
        if ":" in entry and not entry.startswith("["):
            entry = f"[{entry}]"
        try:
            host, _ = normalize_host(entry)
        except _HostError as exc:
            if strict:
                raise ValueError(f"invalid webhook allow-list entry {item!r}: {exc}") from None
            host = entry.lower()
        out.add(host)
    return frozenset(out)


RESOLVE_TIMEOUT_SECONDS = 5.0
# Lookups that hang keep their thread (getaddrinfo cannot be interrupted); with a bounded pool
# they cannot pile up threads, and callers queued behind them still give up on time. One name
# may hold at most LOOKUPS_PER_HOST of them: a name server that never answers (a tenant's own
# domain, say) must not take the pool from everyone else's names.
LOOKUPS_PER_HOST = 2
_resolver = ThreadPoolExecutor(max_workers=32, thread_name_prefix="resolve")
_in_flight: dict[str, int] = {}
_in_flight_lock = threading.Lock()


def _resolve(host: str, port: int) -> list[IPAddress]:
    with _in_flight_lock:
        if _in_flight.get(host, 0) >= LOOKUPS_PER_HOST:
            raise OSError(f"earlier lookups of {host!r} have not finished")
        _in_flight[host] = _in_flight.get(host, 0) + 1

    def finished(_: object) -> None:
        with _in_flight_lock:
            left = _in_flight.pop(host, 1) - 1
            if left > 0:
                _in_flight[host] = left

    lookup = _resolver.submit(
        socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    lookup.add_done_callback(finished)
    try:
        infos = lookup.result(timeout=RESOLVE_TIMEOUT_SECONDS)
    except FutureTimeout:
        lookup.cancel()  # when still queued; its done callback then frees the slot
        raise OSError(f"looking up {host!r} took more than {RESOLVE_TIMEOUT_SECONDS:g} s") from None
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def _describe(shown: str, ip: IPAddress) -> str:
    if shown.strip("[]") == str(ip):
        return f"host {shown}"
    return f"host {shown!r} (the address {ip})"


def check_url(
    url: str, allow_hosts: frozenset[str] = frozenset(), resolve: bool = True
) -> CheckedURL:
    """Check a webhook URL; return it normalised and resolved, or raise :class:`UnsafeURL`.

    ``allow_hosts`` (see :func:`parse_allow_hosts`) exempts exactly those hosts from the address
    checks and permits ``http`` for them. With ``resolve`` false, host names are not resolved
    (``addresses`` is then empty for them); IP literals are always checked.
    """

    def refuse(reason: str) -> UnsafeURL:
        return UnsafeURL(url, reason)

    if not isinstance(url, str) or not url:
        raise refuse("the URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise refuse(f"the URL is {len(url)} characters long; at most {MAX_URL_LENGTH} allowed")
    bad = _FORBIDDEN_CHARS.search(url)
    if bad:
        what = "a backslash" if bad.group() == "\\" else f"the character {bad.group()!r}"
        raise refuse(
            f"the URL contains {what}; whitespace, control characters and "
            "backslashes are not allowed"
        )
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        head = url.split(":", 1)[0].lower() if ":" in url else ""
        if head and re.fullmatch(r"[a-z][a-z0-9+.-]*", head) and head not in _DEFAULT_PORTS:
            raise refuse(f"the scheme {head!r} is not allowed; use https")
        raise refuse("the URL must be absolute and start with https://")
    if scheme not in _DEFAULT_PORTS:
        raise refuse(f"the scheme {scheme!r} is not allowed; use https")
    rest = rest.split("#", 1)[0]
    split_at = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path_and_query = rest[:split_at], rest[split_at:]
    if not path_and_query.isascii():
        raise refuse("the path contains non-ASCII characters; percent-encode them")
    if path_and_query.startswith("?") or not path_and_query:
        path_and_query = "/" + path_and_query
    if "@" in authority:
        raise refuse(
            "the URL contains user info (user:password@); credentials in webhook "
            "URLs are not allowed, and 'x@host' is a common way to disguise the host"
        )
    if authority.startswith("["):
        close = authority.find("]")
        raw_host, port_part = (
            (authority[: close + 1], authority[close + 1 :]) if close >= 0 else (authority, "")
        )
    else:
        raw_host, colon, port_text = authority.partition(":")
        port_part = colon + port_text
    if not raw_host:
        raise refuse("the URL has no host")
    if port_part:
        if not port_part.startswith(":"):
            raise refuse(f"unexpected characters {port_part!r} after the host")
        if not _PORT.fullmatch(port_part[1:]):
            raise refuse(f"the port {port_part[1:]!r} is not a valid port number")
        port = int(port_part[1:])
        if not 1 <= port <= 65535:
            raise refuse(f"the port {port} is out of range (1-65535)")
    else:
        port = _DEFAULT_PORTS[scheme]
    try:
        host, ip = normalize_host(raw_host)
    except _HostError as exc:
        raise refuse(str(exc)) from None
    url_host = f"[{host}]" if ":" in host else host
    port_suffix = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    normalised = f"{scheme}://{url_host}{port_suffix}{path_and_query}"
    if len(normalised) > MAX_URL_LENGTH:
        # Normalising can lengthen a URL ("1.1" is 1.0.0.1, "?q" gets a "/", IDNA), and the
        # normalised one is what is stored.
        raise refuse(
            f"the URL is {len(normalised)} characters long once normalised (host {url_host}); "
            f"at most {MAX_URL_LENGTH} allowed"
        )

    allowed = parse_allow_hosts(allow_hosts, strict=False) if allow_hosts else frozenset()
    is_allowed = host in allowed or (ip is not None and str(_connect_address(ip)) in allowed)
    addresses: list[IPAddress] = []
    if ip is not None:
        if not is_allowed:
            reason = unsafe_address_reason(ip)
            if reason is not None:
                raise refuse(f"{_describe(raw_host, ip)} is {reason}")
        addresses = [ip]
    if scheme == "http" and not is_allowed:
        raise refuse(
            "the scheme 'http' is not allowed; use https (plain http is only "
            "permitted for hosts in LORAPLEX_WEBHOOK_ALLOW_HOSTS)"
        )
    if ip is None and resolve:
        try:
            addresses = _resolve(host, port)
        except (OSError, UnicodeError):
            addresses = []
        if not addresses:
            raise refuse(f"the host {host!r} could not be resolved")
        if not is_allowed:
            for resolved in addresses:
                reason = unsafe_address_reason(resolved)
                if reason is not None:
                    # The category, not the address: a tenant must not be able to map the
                    # internal network's names to addresses through our error messages.
                    raise refuse(f"host {host!r} resolves to {reason}")

    pinned: list[str] = []
    for address in addresses:
        text = str(_connect_address(address))
        if text not in pinned:
            pinned.append(text)
    return CheckedURL(
        url=normalised,
        scheme=scheme,
        host=host,
        port=port,
        path_and_query=path_and_query,
        addresses=pinned,
        allow_listed=is_allowed,
    )


# --- delivery ----------------------------------------------------------------------------------


class _Watchdog:
    """Enforces the total deadline: shuts the connection's socket down when it expires.

    httpx's timeouts apply per network operation, so a receiver trickling one byte at a time
    could otherwise hold a worker forever. The socket is learnt from httpcore's ``trace``
    extension as soon as the TCP connection (and TLS) is up.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sock = sock
                if self.fired:
                    self._shutdown()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket method: SSLSocket.shutdown would tear down its SSL state
                # under the reading thread.
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _ConnectFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _error_text(exc: BaseException, address: str) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connect timeout ({address})"
    if isinstance(exc, httpx.ReadTimeout):
        return "read timeout"
    if isinstance(exc, httpx.WriteTimeout):
        return "write timeout"
    if isinstance(exc, httpx.PoolTimeout):
        return "pool timeout"
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        if "SSL" in detail or "certificate" in detail.lower():
            return f"TLS error ({address}): {detail}"
        return f"connect error ({address}): {detail}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"protocol error: {detail}"
    return f"network error: {detail}"


class SafeWebhookClient:
    """Synchronous SSRF-safe POST for the workers. One instance per process; thread-safe.

    ``post`` never raises for network problems or unsafe URLs: it returns a
    :class:`DeliveryResult` with ``ok`` false and ``error`` saying what happened.
    """

    def __init__(
        self,
        *,
        allow_hosts: frozenset[str] | str = frozenset(),
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        verify: ssl.SSLContext | bool = True,
        user_agent: str = "loraplex-webhooks/1",
    ) -> None:
        self.allow_hosts = parse_allow_hosts(allow_hosts, strict=False)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_response_bytes = max_response_bytes
        self.user_agent = user_agent
        transport = httpx.HTTPTransport(
            verify=verify,
            retries=0,
            # No reuse: a pooled connection is keyed by IP, and reusing one made with another
            # host name's TLS SNI would skip that name's certificate check.
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._client = httpx.Client(
            transport=transport,
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would defeat the IP pinning
            timeout=timeout,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SafeWebhookClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> DeliveryResult:
        """POST ``body`` to ``url`` (checked and resolved again now, then pinned)."""
        start = time.monotonic()

        def elapsed_ms() -> float:
            return (time.monotonic() - start) * 1000.0

        try:
            checked = check_url(url, self.allow_hosts, resolve=True)
        except UnsafeURL as exc:
            return DeliveryResult(None, elapsed_ms(), "", f"refused: {exc.reason}", False)
        deadline = time.monotonic() + self.timeout
        errors: list[str] = []
        for address in checked.addresses:
            if time.monotonic() >= deadline:
                errors.append(f"timeout: no answer within {self.timeout:g} s")
                break
            try:
                return self._attempt(checked, address, body, headers, deadline, start)
            except _ConnectFailed as exc:
                errors.append(exc.message)
        error = "; ".join(errors) or "no address to connect to"
        return DeliveryResult(None, elapsed_ms(), "", error, False)

    def _attempt(
        self,
        checked: CheckedURL,
        address: str,
        body: bytes,
        headers: Mapping[str, str],
        deadline: float,
        start: float,
    ) -> DeliveryResult:
        remaining = max(0.001, deadline - time.monotonic())
        ip_host = f"[{address}]" if ":" in address else address
        request_url = f"{checked.scheme}://{ip_host}:{checked.port}{checked.path_and_query}"
        request_headers = httpx.Headers(
            {"user-agent": self.user_agent, "content-type": "application/json"}
        )
        request_headers.update(dict(headers))
        request_headers["host"] = checked.host_header
        request_headers["accept-encoding"] = "identity"  # bounded reads: no decompression
        watchdog = _Watchdog(deadline)
        extensions: dict[str, Any] = {"trace": watchdog.trace}
        if checked.scheme == "https" and not checked.is_ip_literal:
            extensions["sni_hostname"] = checked.host
        status: int | None = None
        location = ""
        excerpt = b""
        try:
            try:
                request = self._client.build_request(
                    "POST",
                    request_url,
                    content=body,
                    headers=request_headers,
                    extensions=extensions,
                    timeout=httpx.Timeout(remaining, connect=min(self.connect_timeout, remaining)),
                )
                response = self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise _ConnectFailed(_error_text(exc, address)) from None
            try:
                status = response.status_code
                location = response.headers.get("location", "")
                for chunk in response.iter_raw():
                    excerpt += chunk
                    if len(excerpt) >= self.max_response_bytes:
                        break
            finally:
                response.close()
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            if status is None:
                error = (
                    f"timeout: no answer within {self.timeout:g} s"
                    if watchdog.fired
                    else _error_text(exc, address)
                )
                duration = (time.monotonic() - start) * 1000.0
                return DeliveryResult(None, duration, "", error, False, address)
            # The status line arrived; a failure while reading the body only shortens it.
        finally:
            watchdog.cancel()
        duration = (time.monotonic() - start) * 1000.0
        if status is None:  # pragma: no cover - send() either answers or raises
            return DeliveryResult(None, duration, "", "no response", False, address)
        text = excerpt[: self.max_response_bytes].decode("utf-8", errors="replace")
        ok = 200 <= status < 300
        failure: str | None = None
        if 300 <= status < 400:
            target = f" to {location[:200]!r}" if location else ""
            failure = f"redirect ({status}){target} not followed; receivers must answer 2xx"
        elif not ok:
            failure = f"receiver answered HTTP {status}"
        return DeliveryResult(status, duration, text, failure, ok, address)
