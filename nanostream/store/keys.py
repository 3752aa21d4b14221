"""API keys for the HTTP API: created once, shown once, kept only as sha256 digests.

Keys live in NANOSTREAM_HOME/keys.json, rewritten atomically (temp file + os.replace) under
an exclusive lock file, so `nanostream keys ...` and a running server never see half a file.
A key is `ns_` + 32 random bytes (secrets.token_urlsafe): with that much entropy a plain
sha256 is as good as a slow password hash, and it lets the server check a key per request in
microseconds. Lookups hash the presented key and compare it with every stored digest by
hmac.compare_digest, so timing does not reveal how much of a digest matched.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import paths

PREFIX = "ns_"          # recognisable in logs and by secret scanners
KEY_BYTES = 32          # 256 random bits: guessing is hopeless, so a fast hash is enough
MAX_NAME_LENGTH = 64    # names are labels for people, shown in `keys list`
FILE_NAME = "keys.json"


class KeysError(ValueError):
    """A key operation that cannot be done (unknown or duplicate name); the message says why."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    created_at: str              # ISO 8601, UTC
    revoked_at: str | None = None
    digest: str = ""             # sha256 hex of the key; the key itself is never stored

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public(self) -> dict:
        """What `keys list` may show: everything but the digest."""
        return {"name": self.name, "created_at": self.created_at, "revoked": self.revoked,
                "revoked_at": self.revoked_at}


def keys_path() -> Path:
    return paths.home() / FILE_NAME


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read(path: Path) -> list[ApiKey]:
    try:
        return [ApiKey(**row) for row in json.loads(path.read_text())["keys"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        raise KeysError(f"key file {path} is damaged ({exc}); move it away to start afresh") from None


def _write(path: Path, keys: list[ApiKey]) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".partial")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump({"keys": [asdict(k) for k in keys]}, out, indent=1)
        os.chmod(temp, 0o600)  # digests are not secrets, but nobody else needs to read them
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked() -> Iterator[tuple[Path, list[ApiKey]]]:
    """Read-modify-write under an exclusive lock: two `keys create` never lose one another's key."""
    path = keys_path()
    with open(path.with_name(FILE_NAME + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path, _read(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise KeysError("key name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise KeysError(f"key name is longer than {MAX_NAME_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise KeysError(f"key name {name!r} contains control characters")
    return name


def create_key(name: str | None = None) -> tuple[ApiKey, str]:
    """A new key: (its record, the key itself). The key cannot be recovered later."""
    key = PREFIX + secrets.token_urlsafe(KEY_BYTES)
    with _locked() as (path, keys):
        taken = {k.name for k in keys}
        if name is None:
            name = next(f"key-{i}" for i in range(1, len(keys) + 2) if f"key-{i}" not in taken)
        name = _clean_name(name)
        if name in taken:
            raise KeysError(f"a key named '{name}' already exists (names stay taken after revoking)")
        record = ApiKey(name=name, created_at=_now(), digest=_digest(key))
        _write(path, keys + [record])
    return record, key


def list_keys() -> list[ApiKey]:
    """Every key ever created, revoked ones included, oldest first."""
    return _read(keys_path())


def revoke_key(name: str) -> ApiKey:
    """Mark a key revoked (kept, so `keys list` shows when); revoking twice changes nothing."""
    with _locked() as (path, keys):
        match = [k for k in keys if k.name == name]
        if not match:
            known = ", ".join(k.name for k in keys) or "none yet"
            raise KeysError(f"no key named '{name}' (keys: {known})")
        if match[0].revoked:
            return match[0]
        revoked = ApiKey(match[0].name, match[0].created_at, _now(), match[0].digest)
        _write(path, [revoked if k.name == name else k for k in keys])
    return revoked


def find_key(presented: str) -> ApiKey | None:
    """The record of a presented key (revoked ones too, so callers can say so), else None."""
    digest = _digest(presented)
    found = None
    for record in list_keys():  # no early exit: every digest is compared
        if hmac.compare_digest(record.digest, digest):
            found = record
    return found
