"""API keys: `authorization: Bearer <key>` call metadata, mapped to a user.

Keys come from POSEMESH_API_KEYS ("user:key,user2:key2") and/or a file named by POSEMESH_API_KEYS_FILE
(one `user:key` per line, # comments). It fails closed: with no key configured, or a keys file that is
missing, unreadable or empty, the gateway refuses to start. The local stack (`posemesh up`) configures
the development key `dev:posemesh-dev-key` itself when nothing else is set.

Each API key has a webhook signing secret (gateway/webhooks.py signs a task's completion webhook with the
secret of the key that made the task): HMAC-SHA256 keyed with the API key over "posemesh-webhook-signing-v1",
in hex (`webhook_secret`). Its holder computes it from the key (README, "Using the results"); it cannot be
turned back into the key, so a webhook receiver that holds it cannot call the API, and replacing a key
replaces its secret. The gateway stores it sealed with the task that needs it and never logs it.

Every TaskService call is authenticated by the authentication interceptor (gateway/interceptors.py),
before its method runs; the method reads the caller with `caller()`.
"""

from __future__ import annotations

import hmac
from contextvars import ContextVar
from pathlib import Path

import grpc

from posemesh.gateway.validation import Refused

DEV_USER, DEV_KEY = "dev", "posemesh-dev-key"

# The authenticated user of the call being served: set by the authentication interceptor in the call's own
# context (grpc.aio runs the interceptors and then the method in one contextvars.Context per call).
CALLER: ContextVar[str | None] = ContextVar("posemesh_caller", default=None)


WEBHOOK_SECRET_LABEL = b"posemesh-webhook-signing-v1"


def webhook_secret(api_key: str) -> str:
    """The webhook signing secret of an API key (see the module's docstring)."""
    return hmac.new(api_key.encode(), WEBHOOK_SECRET_LABEL, "sha256").hexdigest()


def bearer_key(metadata) -> tuple[str, str]:
    """(the API key of a call's metadata, "") or ("", what is wrong with the metadata)."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        return "", "missing API key: send call metadata 'authorization: Bearer <key>'"
    if len(values) > 1:
        return "", f"{len(values)} authorization headers: send exactly one"
    header = values[0] if isinstance(values[0], str) else ""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return "", "malformed authorization metadata: expected 'Bearer <key>'"
    return key.strip(), ""


class KeyConfigError(RuntimeError):
    """The API keys are not configured usably; the gateway must not start."""


def parse_keys(text: str) -> dict[str, str]:
    """'user:key' items separated by commas or new lines -> {key: user}. A '#' starts a comment to the end
    of its line: comments are cut before lines are split at commas, so no text of a comment (say
    "# e.g. alice:<key>, bob:<key>") can ever become a key."""
    keys = {}
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    for item in (part.strip() for line in lines for part in line.split(",")):
        if not item:
            continue
        user, sep, key = item.partition(":")
        if not sep or not user.strip() or not key.strip():
            raise KeyConfigError(f"bad API key entry: expected user:key, got an entry of {len(item)} characters")
        keys[key.strip()] = user.strip()
    return keys


def load_keys(env_keys: str, keys_file: str) -> dict[str, str]:
    keys = parse_keys(env_keys) if env_keys else {}
    if keys_file:
        try:
            text = Path(keys_file).read_text()
        except OSError as exc:
            raise KeyConfigError(
                f"cannot read the API keys file {keys_file} ({exc.strerror}): refusing to start") from None
        from_file = parse_keys(text)
        if not from_file:
            raise KeyConfigError(f"the API keys file {keys_file} holds no keys: refusing to start")
        keys.update(from_file)
    if not keys:
        raise KeyConfigError("no API keys configured: set POSEMESH_API_KEYS=user:key[,user:key] or "
                             "POSEMESH_API_KEYS_FILE (`posemesh up` sets a development key by itself)")
    return keys


class Authenticator:
    def __init__(self, keys: dict[str, str]):
        self.keys = keys

    def user_of(self, metadata) -> tuple[str | None, str]:
        """(user, "") for a good key, else (None, a message for UNAUTHENTICATED)."""
        key, problem = bearer_key(metadata)
        if not key:
            return None, problem
        found = None
        for known, user in self.keys.items():  # compare with every key: constant time per key
            if hmac.compare_digest(known.encode(), key.encode()):
                found = user
        return (found, "") if found else (None, "unknown API key")


def caller() -> str:
    """The user of the call being served. Fails closed: a method reached without the authentication
    interceptor having found a user is refused, never run for nobody."""
    user = CALLER.get()
    if user is None:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                      "this call was not authenticated: send call metadata 'authorization: Bearer <key>'")
    return user
