"""Which live sources the server may read: an operator's allow-list, because a source URL is a request for
the server to connect somewhere (server-side request forgery).

POSEMESH_LIVE_SOURCES lists what is allowed, comma-separated `scheme://host:port` patterns where host and
port may be `*` or contain `*` (fnmatch), e.g. `rtsp://127.0.0.1:*,rtsp://cam-*.plant.example:554`. Empty
(the default) allows nothing. Only rtsp:// and rtsps:// URLs are sources at all: a file path, a file: URL or
any other scheme is INVALID_ARGUMENT; a well-formed URL outside the list is PERMISSION_DENIED. The host is
matched as written in the URL; the operator allows names or addresses, not what they might resolve to.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc

from posemesh.gateway.validation import Refused, shorten
from posemesh.mesh.at_rest import redact
from posemesh.mesh.live import RTSP_PORTS, Source

SCHEMES = RTSP_PORTS
MAX_URL = 2048


@dataclass(frozen=True)
class _Pattern:
    scheme: str
    host: str
    port: str


class UrlPolicy:
    """An operator's allow-list of URLs the server may connect to: `scheme://host:port` patterns (fnmatch on
    host and port). What differs between uses (live sources here, webhook targets in gateway/webhooks.py)
    is in the class attributes: the schemes and their default ports, the request field and setting named in
    messages, and the status of a well-formed URL outside the list."""

    schemes: dict[str, int] = SCHEMES
    field = "source.url"
    setting = "POSEMESH_LIVE_SOURCES"
    denied = grpc.StatusCode.PERMISSION_DENIED
    example = "rtsp://10.0.0.*:554"

    def __init__(self, patterns: str):
        self.patterns = [self._pattern(p.strip()) for p in patterns.split(",") if p.strip()]

    def _pattern(self, text: str) -> _Pattern:
        scheme, sep, rest = text.partition("://")
        host, _, port = rest.rpartition(":") if rest.count(":") == 1 or rest.startswith("[") else (rest, "", "")
        if not sep or scheme not in self.schemes or not host:
            raise ValueError(f"bad pattern {text!r}: expected scheme://host:port, e.g. {self.example}")
        return _Pattern(scheme, host.strip("[]").lower(), port or str(self.schemes[scheme]))

    def wrong_scheme(self, echo: str) -> str:
        return (f"{self.field} {echo} is not a live source: live sources are rtsp:// or rtsps:// URLs (files are "
                "sent with Upload)")

    def parse(self, url: str) -> Source:
        """The scheme, host and port of a well-formed URL of an accepted scheme; raises Refused
        (INVALID_ARGUMENT) saying what is wrong with it."""
        if not url:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{self.field} is required: rtsp://host[:port]/path")
        if len(url) > MAX_URL or not url.isprintable() or any(c.isspace() for c in url):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{self.field} {shorten(url)} is not a URL: at most {MAX_URL} printable characters, "
                          "no spaces")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        echo = shorten(redact(url))  # errors show the URL as given, less its credentials
        if scheme not in self.schemes:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, self.wrong_scheme(echo))
        try:
            host, port = (parts.hostname or "").lower(), parts.port or self.schemes[scheme]
        except ValueError:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{self.field} {echo} has a bad port") from None
        if not host:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{self.field} {echo} names no host")
        return Source(url, scheme, host, port)

    def allows(self, scheme: str, host: str, port: int) -> bool:
        """Whether a pattern matches (the host as written, or an address it resolved to)."""
        return any(p.scheme == scheme and fnmatch.fnmatchcase(host, p.host) and fnmatch.fnmatchcase(str(port), p.port)
                   for p in self.patterns)

    def check(self, url: str) -> Source:
        """The URL, if the server may connect to it; raises Refused saying why not."""
        source = self.parse(url)
        if self.allows(source.scheme, source.host, source.port):
            return source
        raise Refused(self.denied, self.outside(source))

    def outside(self, source: Source) -> str:
        return (f"this server does not read live sources at {source.scheme}://{source.host[:60]}:{source.port}: "
                f"its operator allows certain hosts only ({self.setting})")


class SourcePolicy(UrlPolicy):
    """Live sources: rtsp:// and rtsps:// only; outside the list is PERMISSION_DENIED."""
