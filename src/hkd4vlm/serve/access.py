"""Access control of the HTTP service: an optional API key, a Host allow-list, and the warning for a server
reachable beyond this machine without a key. ``/healthz`` stays open to both checks (load balancers and
orchestrators probe it by address, without credentials).

Why the Host check: a server bound to loopback is still reachable from a browser on the same machine through
DNS rebinding (a page whose host name first resolves to the attacker, then to 127.0.0.1, talks to the local
server as a same-origin page). Such a request carries the attacker's host name in its ``Host`` header, so a
server that answers only to the names it is known by cannot be reached that way.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from fastapi.responses import JSONResponse

from .requests import error_body

#: paths open without a key and to any Host
OPEN_PATHS = frozenset({"/healthz"})
#: the names a loopback server answers to by default
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: the environment variable the CLI reads the key from
API_KEY_ENV = "HKD4VLM_API_KEY"


def check_api_key(key: str) -> str:
    """The key, or ValueError when it cannot travel in an Authorization header."""
    if not key or any(not (33 <= ord(c) <= 126) for c in key):
        raise ValueError("the API key must be non-empty printable ASCII without spaces (it travels in an HTTP header)")
    return key


class ApiKeyAuth:
    """Refuses every request but those to ``OPEN_PATHS`` unless it carries ``Authorization: Bearer <key>``
    (401 with ``WWW-Authenticate: Bearer``). The key is compared in constant time (``hmac.compare_digest``),
    so that the time to refuse does not tell how much of a guess was right."""

    def __init__(self, app, api_key: str, on_refused=None):
        self.app, self.key = app, check_api_key(api_key).encode()
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused()
        why = "missing" if not header else "not a valid API key"
        body = error_body(f"authorization: {why}; send the header 'Authorization: Bearer <key>'", "authorization")
        return await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def host_name(header: str) -> str:
    """The host name of a Host header, without the port, lower case (IPv6 without brackets)."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostAllowList:
    """Refuses (400, naming the ``host`` field) a request whose ``Host`` is not one of ``allowed``: exact names,
    ``*.example.com`` for its subdomains, or ``*`` for any host."""

    def __init__(self, app, allowed: Iterable[str], on_refused=None):
        self.app, self.allowed = app, tuple(h.lower() for h in allowed)
        self.any = "*" in self.allowed
        self.on_refused = on_refused

    def allows(self, name: str) -> bool:
        return self.any or any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.any or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.allows(host_name(header)):
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused()
        body = error_body(
            f"host: {header[:100]!r} is not a host name this server answers to (allowed: "
            f"{', '.join(self.allowed)}; serve --allowed-host adds one)",
            "host",
        )
        return await JSONResponse(body, status_code=400)(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host names a server bound to ``host`` answers to when none are given: the loopback names, and
    ``host`` itself when it is a specific address; any name when it is bound to every interface (its public
    names are not known here: ``--allowed-host`` sets them)."""
    if is_wildcard(host):
        return ("*",)
    name = host.strip("[]").lower()  # 127.0.0.2, ::ffff:127.0.0.1 and the like are loopback too, but not listed
    return LOOPBACK_HOSTS if name in LOOPBACK_HOSTS else (*LOOPBACK_HOSTS, name)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when a server bound to ``host`` is reachable beyond this machine without an API key."""
    if api_key or is_loopback(host):
        return None
    where = "every network interface" if is_wildcard(host) else host
    return (
        f"warning: serving on {where} without an API key: anyone who can reach this port can use the model. "
        f"Set one with --api-key or the {API_KEY_ENV} environment variable (clients send "
        "'Authorization: Bearer <key>'), or bind to 127.0.0.1."
    )
