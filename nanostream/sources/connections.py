"""HTTP sessions whose every connection goes to a public address checked once, cut off at one
deadline for the whole fetch.

The address check happens where the connection is made: the host of every hop (the first URL
and each redirect) is resolved once, the fetch is refused unless every address is public
(addresses.address_allowed), and the socket connects to one of those very addresses -- so DNS
has no second chance to answer differently (DNS rebinding), and nothing, not even a SYN,
reaches a private address: open and closed private ports get the same sentence. TLS still
checks the certificate and SNI against the host name. Proxies from the environment are
ignored, since a proxy would hide the real destination.

One deadline covers the whole fetch -- connect, status line, headers and body -- enforced by a
Watchdog that shuts the sockets down when it passes, so a server dripping bytes cannot hold a
worker past it (DNS resolution is bounded by the system resolver's own timeout).
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from contextlib import suppress

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .addresses import PRIVATE_REFUSAL, DownloadError, address_allowed

TIMED_OUT = "timed out"
HEADERS = {
    "User-Agent": "NanoStream/0.1 (image classifier builder)",
    "Accept": "image/*",
    "Accept-Encoding": "identity",  # images are already compressed; no gzip bombs to inflate
}


class Watchdog:
    """The whole-fetch deadline: when it passes, every socket of the fetch is shut down.

    A socket timeout only bounds one silent read, and a server sending a byte every few seconds
    never trips it -- in the body, or in the status line and headers that http.client reads
    deep inside requests. shutdown() wakes whichever read is blocked, over TLS too.
    """

    def __init__(self, seconds: float):
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        # A duplicate descriptor of the same socket: wrapping for TLS detaches the original object.
        with self._lock:
            self._sockets.append(sock.dup())

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with suppress(OSError):  # already closed by the other end
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _connect(host: str, port: int, timeout: float, options, watchdog: Watchdog) -> socket.socket:
    """Resolve host once, refuse unless every address is public, then connect to one of them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise DownloadError("cannot resolve host") from None
    if not all(address_allowed(info[4][0], port) for info in infos):
        raise DownloadError(PRIVATE_REFUSAL)
    reason = "connection failed"
    for family, kind, proto, _, address in infos:
        if (remaining := watchdog.remaining()) <= 0:
            raise DownloadError(TIMED_OUT)
        sock = socket.socket(family, kind, proto)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            sock.settimeout(min(timeout, remaining))
            watchdog.watch(sock)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            reason = TIMED_OUT if isinstance(exc, TimeoutError) else "connection failed"
            continue
        if watchdog.expired:  # it passed while connecting, when there was nothing to shut down yet
            sock.close()
            raise DownloadError(TIMED_OUT)
        return sock
    raise DownloadError(reason)


class _CheckedConnection:
    """Mixin for urllib3 connections: connect through _connect, under the fetch's watchdog."""

    def __init__(self, *args, watchdog: Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def _new_conn(self) -> socket.socket:
        return _connect(self.host, self.port, self.timeout, self.socket_options, self._watchdog)


class _CheckedHTTPConnection(_CheckedConnection, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_CheckedConnection, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _CheckedAdapter(HTTPAdapter):
    def __init__(self, watchdog: Watchdog):
        self._watchdog = watchdog
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        # Through the pool class, not pool kwargs: PoolManager builds its pool keys from those.
        self.poolmanager.pool_classes_by_scheme = {
            "http": functools.partial(_CheckedHTTPPool, watchdog=self._watchdog),
            "https": functools.partial(_CheckedHTTPSPool, watchdog=self._watchdog),
        }


def checked_session(watchdog: Watchdog) -> requests.Session:
    """A session for one fetch: every connection checked and pinned (_connect), all under watchdog."""
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: a proxy hides the peer
    session.headers.update(HEADERS)
    for prefix in ("http://", "https://"):
        session.mount(prefix, _CheckedAdapter(watchdog))
    return session
