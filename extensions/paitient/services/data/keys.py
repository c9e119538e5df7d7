"""The pseudonymisation key: one root-only master secret, and a key per project derived from it.

The master key never leaves the data integration centre's side: it lives in ``site.key_file`` (root:root,
0600) and is read only by ``paitient ingest``. Each project gets its own key,
``HMAC-SHA-256(master, "paitient pseudonym domain:" + project)``, so the same patient has unrelated
pseudonyms and date shifts in two projects, while within a project they are stable.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from paitient.config import ConfigError, SiteConfig, check_owner
from paitient.fsutil import create_once
from paitient.services.data.errors import IngestRefused

MIN_KEY_BYTES = 32


class KeyRefused(IngestRefused):
    """The key file is missing or not safe to use; the message says what to do."""


def _check_file(path: Path) -> None:
    try:
        check_owner(path.parent)
        check_owner(path, secret=True)
    except ConfigError as e:
        raise KeyRefused(f"pseudonymisation key refused: {e}") from None


def load_master_key(site: SiteConfig) -> bytes:
    """Read the master key, refusing a missing, short, non-root or group/world-accessible file."""
    path = site.key_file
    if not path.exists():
        raise KeyRefused(
            f"no pseudonymisation key at {path}; create one with `paitient ingest --init-key` "
            "(or restore the site's key from its backup: a new key changes every pseudonym)"
        )
    if not path.is_file() or path.is_symlink():
        raise KeyRefused(f"pseudonymisation key {path} must be a regular file, not a link or directory")
    _check_file(path)
    key = path.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise KeyRefused(
            f"pseudonymisation key {path} holds {len(key)} bytes; it needs at least {MIN_KEY_BYTES} "
            "random bytes (`paitient ingest --init-key` on an empty place makes one)"
        )
    return key


def ensure_key(site: SiteConfig) -> Path:
    """Create the master key if there is none (32 random bytes, root:root 0600); check it either way."""
    path = site.key_file
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_once(path, secrets.token_bytes(MIN_KEY_BYTES))  # never replaces a key created meanwhile
    load_master_key(site)
    return path


def project_key(master: bytes, project: str) -> bytes:
    """The project's own pseudonym domain key."""
    return hmac.new(master, b"paitient pseudonym domain:" + project.encode(), hashlib.sha256).digest()


def key_id(pkey: bytes) -> str:
    """A short public fingerprint of a project key (shows in manifests when the key changed)."""
    return hashlib.blake2b(b"", key=pkey, digest_size=6, person=b"pt-key-id").hexdigest()
