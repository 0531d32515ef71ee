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

from posemesh.gateway.at_rest import redact
from posemesh.gateway.validation import Refused, shorten

SCHEMES = {"rtsp": 554, "rtsps": 322}
MAX_URL = 2048


@dataclass(frozen=True)
class Source:
    url: str  # as given, credentials included: what the server connects to
    scheme: str
    host: str
    port: int

    @property
    def shown(self) -> str:
        """The URL without credentials (user, password, credential-looking query values): what users and
        logs see."""
        return redact(self.url)


@dataclass(frozen=True)
class _Pattern:
    scheme: str
    host: str
    port: str


class SourcePolicy:
    def __init__(self, patterns: str):
        self.patterns = [self._pattern(p.strip()) for p in patterns.split(",") if p.strip()]

    @staticmethod
    def _pattern(text: str) -> _Pattern:
        scheme, sep, rest = text.partition("://")
        host, _, port = rest.rpartition(":") if rest.count(":") == 1 or rest.startswith("[") else (rest, "", "")
        if not sep or scheme not in SCHEMES or not host:
            raise ValueError(f"bad live source pattern {text!r}: expected scheme://host:port, e.g. rtsp://10.0.0.*:554")
        return _Pattern(scheme, host.strip("[]").lower(), port or str(SCHEMES[scheme]))

    def check(self, url: str) -> Source:
        """The source a URL names, if the server may read it; raises Refused saying why not."""
        if not url:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "source.url is required: rtsp://host[:port]/path")
        if len(url) > MAX_URL or not url.isprintable() or any(c.isspace() for c in url):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"source.url {shorten(url)} is not a URL: at most {MAX_URL} printable characters, no spaces")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        echo = shorten(redact(url))  # errors show the URL as given, less its credentials
        if scheme not in SCHEMES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"source.url {echo} is not a live source: live sources are rtsp:// or rtsps:// "
                          "URLs (files are sent with Upload)")
        try:
            host, port = (parts.hostname or "").lower(), parts.port or SCHEMES[scheme]
        except ValueError:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"source.url {echo} has a bad port") from None
        if not host:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"source.url {echo} names no host")
        source = Source(url, scheme, host, port)
        for p in self.patterns:
            if p.scheme == scheme and fnmatch.fnmatchcase(host, p.host) and fnmatch.fnmatchcase(str(port), p.port):
                return source
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"this server does not read live sources at {scheme}://{host[:60]}:{port}: its operator "
                      "allows certain hosts only (POSEMESH_LIVE_SOURCES)")
