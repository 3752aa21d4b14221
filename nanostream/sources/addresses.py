"""Which URLs and addresses a fetch may use: URLs read the way the HTTP client reads them, and
public addresses only.

A URL is read the way the HTTP client will read it, or refused: no backslash, space, control
character or user name, and urllib's and urllib3's parsers must agree on its host and port
(`check_url`). An address is allowed when it is globally routable unicast (`address_allowed`);
connections.py applies that rule to every address a host resolves to, where the socket is made.
Every refusal is a DownloadError whose reason the user reads, quoting at most QUOTE_CHARS of
the input (`clip_input`).
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

import requests
import urllib3

ALLOW_PRIVATE_ENV = "NANOSTREAM_ALLOW_PRIVATE_HOSTS"  # "1": tests against 127.0.0.1 only
# Signed CDN links reach 1-2 KB; longer "URLs" are abuse, and every message about one stays small.
MAX_URL_CHARS = 4096
QUOTE_CHARS = 200  # the most of any input a message repeats
# The one sentence for every private target, reachable or not, whatever kind of address it is.
PRIVATE_REFUSAL = "refused: private address (only public addresses are fetched)"


class DownloadError(Exception):
    """A URL that did not give an image; .reason says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def clip_input(text: str) -> str:
    """At most QUOTE_CHARS of an input, for a message that repeats it."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


# ---------------------------------------------------------------- reading a URL

def check_url(url: str) -> None:
    """Raise DownloadError unless url is http(s) and reads the same to us and to the HTTP client.

    urlsplit is what we check, urllib3's parse_url (inside requests) is what connects: any URL
    the two could read differently is refused rather than guessed at. `\\` is the known case
    (`http://127.0.0.1:22\\@1.2.3.4/`: urlsplit sees 1.2.3.4, urllib3 connects to 127.0.0.1).
    """
    if len(url) > MAX_URL_CHARS:
        raise DownloadError(f"refused: URL longer than {MAX_URL_CHARS:,} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # bad port or IPv6 literal; its text would quote the input
        raise DownloadError("refused: malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise DownloadError(f"refused: scheme {clip_input(parts.scheme) or '(none)'!r} (only http and https)")
    if "\\" in url or " " in url or not url.isprintable():  # isprintable: no control or other space characters
        raise DownloadError("refused: URL contains a backslash, space or control character")
    if "@" in parts.netloc:
        raise DownloadError("refused: URL with a user name or password")
    if not parts.hostname:
        raise DownloadError("refused: no host in URL")
    if not parts.hostname.isascii():
        raise DownloadError("refused: non-ASCII host name (send its xn-- form)")
    sent = _sent_host_and_port(url)
    if sent is None:
        raise DownloadError("refused: malformed URL")
    if sent != (parts.hostname, port or (443 if parts.scheme == "https" else 80)):
        raise DownloadError("refused: ambiguous URL (parsers disagree on its host)")


def _sent_host_and_port(url: str) -> tuple[str, int] | None:
    """Host and port of the URL requests will send, as urllib3 reads it; None if it cannot."""
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)  # requote_uri decodes %-escapes: "%31%32%37.0.0.1" becomes 127.0.0.1
        sent = urllib3.util.parse_url(prepared.url)
    except (requests.RequestException, urllib3.exceptions.LocationParseError, ValueError):
        return None
    return (sent.host or "").strip("[]").lower(), sent.port or (443 if sent.scheme == "https" else 80)


# ---------------------------------------------------------------- addresses

def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(address: str, port: int) -> bool:
    """Whether a fetch may connect to this IP: a globally routable unicast address.

    `port` is unused by the rule itself; it is there so tests can allow exactly one server.
    """
    if os.environ.get(ALLOW_PRIVATE_ENV) == "1":
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)):
        ip = inner
    # is_global alone lets a few through (multicast ranges count as global)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)
