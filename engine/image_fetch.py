"""Remote image fetches that cannot be turned against the network the server runs in.

``fetch_image`` defends against server-side request forgery without trusting the
network: each host name is resolved once, every address it resolves to is checked (one refused
address refuses the name: a name mixing public and internal addresses is a rebinding setup), and the
connection goes to a checked address itself (no second lookup, so DNS rebinding cannot swap in an
internal address); TLS still verifies the certificate against the host name (SNI). Redirects are
followed by hand, each target resolved and checked the same way. Environment proxies
(``HTTP(S)_PROXY``) are not used: a proxy would do its own lookup and defeat the pinned-address
check, which is the guard. One deadline bounds each image: lookup, connect, every redirect and the
whole body, so a slow-drip server cannot hold a worker past ``fetch_timeout_s``.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Union

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .images import ImagePolicy

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def image_error(message: str, code: str) -> InvalidRequestError:
    """A refused image: always a 400 on ``messages``, with one of the codes ``engine.images`` lists."""
    return InvalidRequestError(message, param="messages", code=code)


def too_large(what: str, size: int, limit: int) -> InvalidRequestError:
    return image_error(f"image {what} is {size:,}, over the limit of {limit:,}", "image_too_large")


class _Deadline:
    """One image's total time budget; ``remaining`` raises ``TimeoutError`` once it is spent."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("image fetch deadline passed")
        return left


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # as the URL names it (brackets of an IPv6 literal removed): SNI, certificate and Host
    port: int
    path: str  # request target: path and query


_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_REQUEST_HEADERS = {"User-Agent": "mlx-serving", "Accept": "image/*", "Accept-Encoding": "identity"}
_CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Name lookups run here so the deadline bounds them too (getaddrinfo takes no timeout); a lookup
# that outlives its deadline finishes in the background, and at most this many run at once.
_RESOLVER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="image-dns")


def fetch_image(url: str, policy: ImagePolicy) -> bytes:
    """GET ``url`` within ``policy``: pinned, checked addresses; manual redirects; one deadline."""
    if not policy.allow_remote:
        raise image_error("remote image URLs are not allowed by this server; send the image as a data: URI",
                     "image_url_not_allowed")
    deadline = _Deadline(policy.fetch_timeout_s)
    networks = policy.remote_networks()
    try:
        for hop in range(policy.max_redirects + 1):
            result = _get_once(_parse_remote_url(url, redirected=hop > 0), networks, policy, deadline)
            if isinstance(result, bytes):
                return result
            url = urllib.parse.urljoin(url, result)
        raise image_error(f"fetching the image failed: more than {policy.max_redirects} redirects",
                     "image_fetch_failed")
    except InvalidRequestError:
        raise
    except TimeoutError:
        raise image_error(f"fetching the image failed: it took longer than {policy.fetch_timeout_s:g} s",
                     "image_fetch_failed") from None
    except ssl.SSLCertVerificationError:
        raise image_error("fetching the image failed: the server's TLS certificate is not valid for its name",
                     "image_fetch_failed") from None
    except ssl.SSLError:
        raise image_error("fetching the image failed: TLS error", "image_fetch_failed") from None
    except ConnectionRefusedError:
        raise image_error("fetching the image failed: connection refused", "image_fetch_failed") from None
    except (http.client.HTTPException, OSError, ValueError):
        raise image_error("fetching the image failed: the server could not be reached or sent a malformed response",
                     "image_fetch_failed") from None


def _parse_remote_url(url: str, *, redirected: bool) -> _Target:
    """The parts of an http(s) URL we connect with; anything else is refused."""
    where = "redirect target" if redirected else "image URL"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise image_error(f"malformed {where}", "image_url_not_allowed") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise image_error(f"{where} scheme {scheme or '(none)'!r} refused: only http and https are fetched",
                     "image_url_not_allowed")
    if not parts.hostname:
        raise image_error(f"{where} has no host", "image_url_not_allowed")
    if parts.username is not None or parts.password is not None:
        raise image_error(f"{where} with credentials refused", "image_url_not_allowed")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, parts.hostname, port or (443 if scheme == "https" else 80), path)


def _get_once(t: _Target, networks: list[IPNetwork], policy: ImagePolicy, deadline: _Deadline) -> bytes | str:
    """One request to a checked address of ``t.host``: the body, or a redirect's ``Location``."""
    infos = _check_addresses(t.host, _resolve(t.host, t.port, deadline), networks)
    sock = _connect(infos, deadline)
    try:
        if t.scheme == "https":
            sock.settimeout(deadline.remaining())  # bounds the whole handshake (CPython applies it as a deadline)
            sock = _tls_context().wrap_socket(sock, server_hostname=t.host)
        conn = http.client.HTTPConnection(t.host, t.port)  # never connects: its socket is set here
        conn.default_port = 443 if t.scheme == "https" else 80  # Host: carries the port only when not default
        conn.sock = _DeadlineSocket(sock, deadline)
        conn.request("GET", t.path, headers=_REQUEST_HEADERS)
        resp = conn.getresponse()
        if resp.status in _REDIRECT_STATUSES:
            location = resp.getheader("Location")
            if not location:
                raise image_error(f"fetching the image failed: HTTP {resp.status} without a Location",
                             "image_fetch_failed")
            return location
        if not 200 <= resp.status < 300:
            raise image_error(f"fetching the image failed: HTTP {resp.status} {resp.reason[:64]}", "image_fetch_failed")
        return _read_body(resp, policy, deadline)
    finally:
        sock.close()


def _resolve(host: str, port: int, deadline: _Deadline) -> list[tuple]:
    """``getaddrinfo`` once, within the deadline. Its answer is all this fetch hop ever connects to."""
    budget = deadline.remaining()
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        infos = future.result(timeout=budget)
    except FutureTimeoutError:
        future.cancel()
        raise TimeoutError("name lookup deadline passed") from None
    except (socket.gaierror, UnicodeError):
        raise image_error("fetching the image failed: its host name could not be resolved", "image_fetch_failed") from None
    if not infos:
        raise image_error("fetching the image failed: its host name has no address", "image_fetch_failed")
    return infos


def _check_addresses(host: str, infos: list[tuple], networks: list[IPNetwork]) -> list[tuple]:
    """``infos`` unchanged when every address is allowed; refused as a whole when any is not (a name
    mixing public and internal addresses is a rebinding setup, not something to pick from)."""
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if _allow_listed(ip, networks):
            continue
        reason = _forbidden_reason(ip)
        if reason is not None:
            raise image_error(f"image host {host!r} resolves to a {reason} address; this server does not fetch from "
                         "such addresses", "image_url_not_allowed")
    return infos


def _allow_listed(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """In an allowed network, itself or as the IPv4 address an IPv4-mapped IPv6 address is."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return any(ip in n or (mapped is not None and mapped in n) for n in networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64): each is checked too."""
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def _forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from (a word for the client), or None when it is global."""
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded_ipv4(ip):
            reason = _forbidden_reason(inner)
            if reason is not None:
                return f"{reason} (IPv4 within IPv6)"
    checks = (
        ("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified), ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast), ("private", ip.is_private), ("reserved", ip.is_reserved),
        ("site-local", getattr(ip, "is_site_local", False)),
        ("non-global", not ip.is_global),  # 100.64.0.0/10 (carrier-grade NAT) and other special ranges
    )
    return next((name for name, hit in checks if hit), None)


def _connect(infos: list[tuple], deadline: _Deadline) -> socket.socket:
    """A TCP connection to the first checked address that answers (no name lookup here)."""
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            last = e
    assert last is not None  # infos is never empty
    raise last


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """System trust store, certificate and host name checked (one context: loading the store costs)."""
    return ssl.create_default_context()


class _DeadlineReader(io.RawIOBase):
    """Receives from ``sock`` with the socket timeout set to the time left before every receive."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._sock.settimeout(self._deadline.remaining())
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The socket ``http.client`` sees: every send and every receive (status line, headers, body)
    bounded by the time left, so a server that drips bytes is cut off at the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.remaining())
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"unsupported mode {mode!r}")
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        """No-op: ``_get_once`` closes the real socket once it is done with the response."""


def _read_body(resp: http.client.HTTPResponse, policy: ImagePolicy, deadline: _Deadline) -> bytes:
    """The body, in chunks, never more than ``max_bytes + 1`` of it read, the deadline checked between."""
    declared = resp.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise too_large("download", int(declared), policy.max_bytes)
    body = bytearray()
    while len(body) <= policy.max_bytes:
        deadline.remaining()
        chunk = resp.read(min(_CHUNK, policy.max_bytes + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > policy.max_bytes:
        raise too_large("download", len(body), policy.max_bytes)
    return bytes(body)
