"""API keys: `authorization: Bearer <key>` call metadata, mapped to a user.

Keys come from POSEMESH_API_KEYS ("user:key,user2:key2") and/or a file named by POSEMESH_API_KEYS_FILE
(one `user:key` per line, # comments). With neither set, the local stack's development key
`dev:posemesh-dev-key` is accepted (and the gateway says so in its log).
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

log = logging.getLogger("posemesh.gateway")

DEV_USER, DEV_KEY = "dev", "posemesh-dev-key"


def parse_keys(text: str) -> dict[str, str]:
    """'user:key' items separated by commas or new lines -> {key: user}."""
    keys = {}
    for item in text.replace(",", "\n").splitlines():
        item = item.split("#", 1)[0].strip()
        if not item:
            continue
        user, sep, key = item.partition(":")
        if not sep or not user.strip() or not key.strip():
            raise ValueError(f"bad API key entry {item!r}: expected user:key")
        keys[key.strip()] = user.strip()
    return keys


def load_keys(env_keys: str, keys_file: str) -> dict[str, str]:
    keys = parse_keys(env_keys) if env_keys else {}
    if keys_file:
        keys.update(parse_keys(Path(keys_file).read_text()))
    if not keys:
        log.warning("no API keys configured: accepting the development key for user %r", DEV_USER)
        keys = {DEV_KEY: DEV_USER}
    return keys


class Authenticator:
    def __init__(self, keys: dict[str, str]):
        self.keys = keys

    def user(self, context: grpc.ServicerContext) -> str:
        """The caller's user, or abort UNAUTHENTICATED."""
        header = dict(context.invocation_metadata()).get("authorization", "")
        if not header:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing API key: send call metadata 'authorization: Bearer <key>'")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata: expected 'Bearer <key>'")
        for known, user in self.keys.items():  # constant-time per key
            if hmac.compare_digest(known.encode(), key.strip().encode()):
                return user
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
