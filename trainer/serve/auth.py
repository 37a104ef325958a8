"""Who may use `ftlab serve`: the Host it is reached by, the web page a browser request comes from, the key.

`Guard` is the app's outermost middleware, so each request is checked before its body is read:

1. **Host** (against DNS rebinding: a foreign web site whose name resolves to 127.0.0.1). Without a
   key, only loopback names are answered (`localhost`, `127.0.0.1`, `[::1]`, any port) plus
   `server.allowed_hosts`. With a key, any Host is, unless `server.allowed_hosts` is set: then the
   same list applies. Anything else gets a 400 `invalid_host`.
2. **Origin** (against cross-site requests from the user's browser): a POST, PUT, PATCH or DELETE whose
   `Origin` is present and not the server's own (the request's scheme, Host and port), or is `null`,
   or whose `Sec-Fetch-Site` says `cross-site` / `same-site`, gets a 403 `cross_origin_request`.
   Clients other than browsers (the openai client, curl) send no Origin and pass.
3. **Key**: with a key configured, every path but the dashboard's pages and assets (which hold no
   data) needs `Authorization: Bearer <key>`, compared in constant time; else 401 `invalid_api_key`.

Starlette's `TrustedHostMiddleware` would do step 1, but its refusal is plain text, not the hosted
error the openai client reads, and step 2 needs the allowed Host anyway; so one middleware does all three.
"""
import hmac
import ipaddress
import re
from typing import Iterable, Optional
from urllib.parse import urlsplit

from trainer.serve.errors import error_response

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?")


def is_loopback(host: str) -> bool:
    """Whether a host name or address (IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host(value: str) -> Optional[tuple[str, Optional[int]]]:
    """(lower-case host without brackets, port or None) of a Host header, or None if it is not one."""
    match = _HOST.fullmatch(value or "")
    if match is None:
        return None
    host = (match["ipv6"] or match["name"]).lower()
    if match["ipv6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    port = int(match["port"]) if match["port"] else None
    return (host, port) if port is None or port <= 65535 else None


def allowed_host_names(entries: Iterable[str]) -> frozenset[str]:
    """`server.allowed_hosts` as names to compare Host headers with; raises ValueError naming a bad entry."""
    names = set()
    for entry in entries or ():
        bare = str(entry).strip().strip("[]")
        parsed = parse_host(f"[{bare}]" if ":" in bare else bare)  # an IPv6 address may come without brackets
        if parsed is None or parsed[1] is not None:
            raise ValueError(f"server.allowed_hosts: {entry!r} is not a host name or address; list names such as "
                             "gpu-box.lan or 10.0.0.5, without a scheme or port (any port is accepted)")
        names.add(parsed[0])
    return frozenset(names)


def _origin(value: str) -> Optional[tuple[str, str, int]]:
    """(scheme, host, port) of an Origin header, or None for `null` or anything that is not an origin."""
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not host or parts.path or parts.query or parts.username:
        return None
    return parts.scheme, host, port or DEFAULT_PORTS[parts.scheme]


class Guard:
    """ASGI middleware: Host, then Origin, then the key (module docstring); `public(path)` says which
    paths are served without the key (the dashboard's pages and assets)."""

    def __init__(self, app, api_key: Optional[str], allowed_hosts: Iterable[str] = (), public=lambda path: False):
        self.app, self.api_key, self.public = app, api_key or None, public
        extra = allowed_host_names(allowed_hosts)
        self.any_host = bool(self.api_key) and not extra  # the key protects a server reached by any name
        self.hosts = extra

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope):
        """The error response for a request that may not go on, or None."""
        headers = _headers(scope)
        host = parse_host(headers.get("host", ""))
        if host is None:
            return error_response(400, "The request's Host header is missing or malformed", None, "invalid_host")
        if not self.any_host and not is_loopback(host[0]) and host[0] not in self.hosts:
            names = ", ".join(["localhost", "127.0.0.1", "[::1]", *sorted(self.hosts)])
            return error_response(400, f"This server does not answer to the host name {host[0]!r} (it answers to "
                                  f"{names}). To reach it by this name, add it to server.allowed_hosts.",
                                  None, "invalid_host")
        if scope["method"] in STATE_CHANGING:
            refused = self.cross_site(scope, headers, host)
            if refused:
                return error_response(403, f"Cross-site {scope['method']} refused: {refused}. Only the dashboard this "
                                      "server serves may change things from a browser; other clients send no "
                                      "Origin header.", None, "cross_origin_request")
        if self.api_key and not self.public(scope["path"]) and not self.key_matches(headers):
            return error_response(401, "Incorrect API key provided. Send the server's key (server.api_key or "
                                  "FTLAB_API_KEY) as the client's api_key (Authorization: Bearer <key>).",
                                  None, "invalid_api_key")
        return None

    @staticmethod
    def cross_site(scope, headers: dict, host: tuple[str, Optional[int]]) -> Optional[str]:
        """Why a state-changing request looks cross-site (its Origin or Sec-Fetch-Site), or None."""
        site = headers.get("sec-fetch-site", "").lower()
        if site in ("cross-site", "same-site"):
            return f"Sec-Fetch-Site is {site}"
        if "origin" not in headers:
            return None
        own = (scope["scheme"], host[0], host[1] or DEFAULT_PORTS.get(scope["scheme"], 80))
        origin = _origin(headers["origin"])
        if origin != own:
            return f"Origin {headers['origin']!r} is not this server's origin ({own[0]}://{headers['host']})"
        return None

    def key_matches(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _headers(scope) -> dict[str, str]:
    """The request's headers, names lower-cased; a header sent twice keeps its first value."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers
