"""What the gateway keeps on disk stays its own: a live task's camera URL (rtsp://user:password@host/...) is
stored sealed, never in plain text (so is the URL in the job that hands the camera to the ingest stage, which
opens it with the same key, `for_reader`); the task database and the data folder are not readable by other users;
what users and logs see of a URL carries no credentials.

- **Sealing**: Fernet from `cryptography` (AES-128-CBC with HMAC-SHA256, a random IV per value), stored as
  `fernet:<token>`. A value sealed under a key the server no longer has cannot be opened: `Unreadable`
  says so in words a person can act on, and the task that needed it fails with that reason.
- **The key**: `POSEMESH_SECRETS_KEY_FILE` names a file of Fernet keys, one per line (a Kubernetes Secret
  or a Compose secret in production). The first key seals; every key opens, so a key is rotated by putting
  the new one first and dropping the old one once no task sealed with it is running. Unset (the embedded
  single-machine default): `secrets.key` in the data folder, made on the first start with mode 0600, and
  said so in the log. That default guards copies of the database (backups, a stray `-wal` file), not a
  copy of the whole data folder: production keeps the key apart from the data volume.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("posemesh.secrets")

PREFIX = "fernet:"
KEY_FILE = "secrets.key"  # the default key file, in the data folder
# Query parameters that carry credentials in some cameras' URLs (?user=admin&password=...): shown as ***.
SECRET_PARAMS = {"password", "passwd", "pass", "pwd", "secret", "token", "key", "apikey", "api_key", "auth",
                 "authorization", "access_token", "signature", "sig", "credential", "credentials"}


class KeyFileError(Exception):
    """The key file cannot be used (missing, unreadable, not Fernet keys): the gateway does not start."""


class Unreadable(Exception):
    """A stored value was sealed under a key the server does not have."""


def redact(url: str) -> str:
    """A URL as users and logs see it: no user name or password, credential-looking query values as ***,
    no fragment."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a bad port: show the host only
        host, port = parts.hostname or "", None
    netloc = f"[{host}]" if ":" in host else host
    if port:
        netloc += f":{port}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def private_dir(path: Path) -> None:
    """Make `path` (with its parents) and take other users' access away from it; group access stays (the
    annotate workers share the data folder, possibly as another member of the group)."""
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o007:
        try:
            path.chmod(mode & ~0o007)
        except PermissionError:  # e.g. a volume's root owned by root: say so, the files in it stay 0600
            log.warning("cannot take other users' access away from %s (mode %o): not its owner", path, mode)


def private_file(path: Path) -> None:
    """Create `path` if missing, readable and writable by its owner only (mode 0600)."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if stat.S_IMODE(path.stat().st_mode) != 0o600:
        path.chmod(0o600)


class SecretBox:
    """Seals and opens the secrets the gateway stores."""

    def __init__(self, keys: list[bytes], source: str = ""):
        if not keys:
            raise KeyFileError(f"{source or 'the key file'} holds no key")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError:
            raise KeyFileError(f"{source or 'the key file'}: every line must be a Fernet key (32 url-safe "
                               "base64-encoded bytes, e.g. from `python -c 'from cryptography.fernet import "
                               "Fernet; print(Fernet.generate_key().decode())'`)") from None
        self.source = source

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        try:
            lines = path.read_text().split()
        except OSError as exc:
            raise KeyFileError(f"POSEMESH_SECRETS_KEY_FILE {path}: cannot read it ({exc.strerror})") from None
        return cls([line.encode() for line in lines if line], source=str(path))

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> SecretBox:
        """The single-machine default: the data folder's key file, made on the first start (mode 0600)."""
        private_dir(data_dir)
        path = data_dir / KEY_FILE
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key() + b"\n")
            log.info("made a new key for the camera credentials the gateway stores: %s (mode 0600). Keep it with "
                     "the data folder; in production give the key with POSEMESH_SECRETS_KEY_FILE instead", path)
        return cls.from_file(path)

    @classmethod
    def for_settings(cls, settings) -> SecretBox:
        """POSEMESH_SECRETS_KEY_FILE when set (it must exist), else the data folder's own key."""
        if settings.secrets_key_file:
            return cls.from_file(Path(settings.secrets_key_file))
        return cls.in_data_dir(settings.data_dir)

    @classmethod
    def for_reader(cls, settings) -> SecretBox:
        """For a process that opens what the gateways sealed (an ingest replica reading a camera): their key,
        never a new one. POSEMESH_SECRETS_KEY_FILE when set, else the data folder's (one machine's stack,
        where the workers share the gateway's data folder)."""
        if settings.secrets_key_file:
            return cls.from_file(Path(settings.secrets_key_file))
        path = settings.data_dir / KEY_FILE
        if not path.exists():
            raise KeyFileError(f"no key to open the camera URLs the gateways sealed: set POSEMESH_SECRETS_KEY_FILE "
                               f"to the gateways' key file (there is no {path})")
        return cls.from_file(path)

    def seal(self, text: str) -> str:
        return PREFIX + self._fernet.encrypt(text.encode()).decode()

    @staticmethod
    def sealed(stored: str) -> bool:
        return stored.startswith(PREFIX)

    def open(self, stored: str, what: str = "the value") -> str:
        """The text a sealed value holds (a value stored before sealing existed is returned as it is)."""
        if not self.sealed(stored):
            return stored
        try:
            return self._fernet.decrypt(stored.removeprefix(PREFIX).encode()).decode()
        except InvalidToken:
            raise Unreadable(
                f"{what} was encrypted with a key this server does not have: POSEMESH_SECRETS_KEY_FILE (or the data "
                f"folder's {KEY_FILE}) changed without keeping the old key on its second line") from None
