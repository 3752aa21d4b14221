"""Who may use what: editors edit projects, everyone else sees demos; and how often one client
may ask for predictions.

Who edits (decide(), from what app.py reads off Streamlit):
* With Streamlit's `[auth]` section in .streamlit/secrets.toml (OIDC sign-in: redirect_uri,
  cookie_secret, client_id, client_secret, server_metadata_url), every page but the demo needs
  sign-in, and only editors edit: NANOSTREAM_EDITORS, comma-separated e-mail addresses, or `*`
  for anyone who signs in. An address the provider says it has not verified is no editor's.
* Without `[auth]` nobody signs in, so the app edits only for the machine it runs on: a loopback
  client (st.context.ip_address is None for 127.0.0.1 and ::1) whose request came through no
  proxy (a proxy on this machine makes every visitor look local, but says whom it forwards).
  Everyone else sees demo pages only.

How often (RateLimiter: a token bucket per client, `burst` at once, refilled at `per_minute`):
  NANOSTREAM_DEMO_PER_MINUTE (default 20) and NANOSTREAM_DEMO_BURST (5): the app's demo page,
  per visitor address. A person tries a photo every few seconds; a script trying thousands is
  held to 20 a minute, which one CPU core answers with room to spare.
  NANOSTREAM_API_PER_MINUTE (60) and NANOSTREAM_API_BURST (10): `nanostream serve`'s callers
  without an API key, per address (api/limits.py); a key is not limited.
Behind a reverse proxy every visitor has the proxy's address, so they share one budget: raise
the budget there, or limit at the proxy.
The `limits` package was weighed for this and left: it has fixed and moving windows but no token
bucket (a burst, then a steady refill), and its memory storage reads the wall clock on a timer
thread of its own, so the budget could not be tested without sleeping.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

VIEW_ONLY = "you can view demos only"   # what every signed-in non-editor and remote visitor reads
PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")  # what a reverse proxy adds


# ---------------------------------------------------------------- who edits

@dataclass(frozen=True)
class Editors:
    """NANOSTREAM_EDITORS: the e-mail addresses that may edit once signed in."""

    emails: frozenset[str] = frozenset()
    anyone: bool = False      # `*`: every signed-in user edits (a provider that admits only your team)

    @classmethod
    def parse(cls, text: str | None) -> Editors:
        names = {part.strip().lower() for part in (text or "").split(",") if part.strip()}
        return cls(frozenset(names - {"*"}), "*" in names)

    @classmethod
    def from_env(cls) -> Editors:
        return cls.parse(os.environ.get("NANOSTREAM_EDITORS"))

    def include(self, email: str | None) -> bool:
        return self.anyone or (email or "").strip().lower() in self.emails


@dataclass(frozen=True)
class Visitor:
    """What the app knows of the person behind one browser session."""

    signed_in: bool = False
    email: str | None = None
    email_verified: bool | None = None  # the provider's claim; None when it sends none
    ip_address: str | None = None       # st.context.ip_address: None for a loopback client
    forwarded: bool = False             # the request came through a proxy (PROXY_HEADERS)


@dataclass(frozen=True)
class Access:
    can_edit: bool
    sign_in: bool = False     # offer the sign-in button: sign-in is configured and this visitor has not
    notice: str = ""          # what someone who cannot edit reads; "" for an editor


def is_local(visitor: Visitor) -> bool:
    """A client on this machine that came through no proxy."""
    if visitor.forwarded:
        return False
    if visitor.ip_address is None:
        return True
    try:
        address = ipaddress.ip_address(visitor.ip_address)
    except ValueError:  # not an address: nothing says it is local
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def decide(visitor: Visitor, auth_configured: bool, editors: Editors) -> Access:
    """May this visitor edit; if not, what they read and whether to offer sign-in."""
    if not auth_configured:
        if is_local(visitor):
            return Access(True)
        return Access(False, notice=f"This app has no sign-in, so projects can be edited only on the computer "
                                    f"it runs on: {VIEW_ONLY}. Open a demo link to try a model.")
    if not visitor.signed_in:
        return Access(False, sign_in=True, notice="Sign in to open your projects. A demo link works without "
                                                  "signing in.")
    if editors.include(visitor.email) and visitor.email_verified is not False:
        return Access(True)
    who = f"as {visitor.email}" if visitor.email else "without an e-mail address"
    return Access(False, notice=f"You are signed in {who}, which is not an editor of this app: {VIEW_ONLY}. "
                                f"Ask its owner to add your address to NANOSTREAM_EDITORS.")


def visitor_from(user: Mapping, ip_address: str | None, headers: Mapping[str, str]) -> Visitor:
    """A Visitor from st.user, st.context.ip_address and st.context.headers.

    Streamlit gives a str, or None for a loopback client. AppTest's stand-in client has a mock
    there, no address at all: it reads as None, the script running on this machine."""
    ip_address = ip_address if isinstance(ip_address, str) else None
    forwarded = any(name.lower() in PROXY_HEADERS for name in headers)
    if not user.get("is_logged_in"):
        return Visitor(ip_address=ip_address, forwarded=forwarded)
    verified = user.get("email_verified")
    return Visitor(True, user.get("email"), None if verified is None else bool(verified), ip_address, forwarded)


def startup_notice(auth_configured: bool, editors: Editors) -> str:
    """What the app says once when it starts: who can edit it."""
    if not auth_configured:
        return ("NanoStream: no [auth] section in .streamlit/secrets.toml, so there is no sign-in: projects can be "
                "edited only from this computer (127.0.0.1), and everyone else sees demo pages only.")
    if editors.anyone:
        return "NanoStream: sign-in is on; everyone who signs in may edit (NANOSTREAM_EDITORS=*)."
    if not editors.emails:
        return ("NanoStream: sign-in is on but NANOSTREAM_EDITORS is empty, so nobody may edit: set it to the "
                "editors' e-mail addresses, comma-separated.")
    return f"NanoStream: sign-in is on; {len(editors.emails)} editor(s) may edit (NANOSTREAM_EDITORS)."


# ---------------------------------------------------------------- how often

def client_of(host: str | None) -> str:
    """Whose budget a request from this address spends.

    An IPv6 address counts by its /64, the block one host is usually given: a caller could
    otherwise take a fresh address, and so a fresh budget, for every request.
    """
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:  # no address: this machine (st.context), a unix socket or a test client
        return f"address {host or 'unknown'}"
    if address.version == 6 and address.ipv4_mapped is not None:  # ::ffff:1.2.3.4 is the IPv4 caller 1.2.3.4
        address = address.ipv4_mapped
    if address.version == 6:
        return f"address {ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"address {address}"


@dataclass(frozen=True)
class Budget:
    per_minute: float
    burst: int

    @classmethod
    def from_env(cls, prefix: str, per_minute: float, burst: int) -> Budget:
        """PREFIX_PER_MINUTE and PREFIX_BURST, else the defaults given; a bad value fails with its name."""
        def number(name: str, default: float, kind: type) -> float:
            text = os.environ.get(name, "").strip()
            try:
                value = kind(text) if text else default
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a number") from None
            if value <= 0:
                raise ValueError(f"{name} must be above 0, not {text}")
            return value

        return cls(number(f"{prefix}_PER_MINUTE", per_minute, float), int(number(f"{prefix}_BURST", burst, int)))


def demo_budget() -> Budget:
    return Budget.from_env("NANOSTREAM_DEMO", 20, 5)


def api_budget() -> Budget:
    return Budget.from_env("NANOSTREAM_API", 60, 10)


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at `per_minute`.

    Past max_clients the client seen longest ago is forgotten, which only gives it a full bucket
    back: memory stays bounded under a flood of addresses. A lock makes it safe from the
    Streamlit sessions' threads; the API's event loop holds it for microseconds.
    """

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.per_second, self.burst = per_minute / 60, max(1, burst)
        self.max_clients, self.clock = max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """Spends a token of this client's: 0.0 if it had one, else the seconds until it will."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.per_second)
            admitted = tokens >= 1
            self._buckets[client] = (tokens - 1 if admitted else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return 0.0 if admitted else (1 - tokens) / self.per_second
