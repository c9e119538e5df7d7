"""The training runner's Ed25519 signing key: private and root-only, its public half published.

The private key is 32 random bytes (the Ed25519 seed) at ``<state_dir>/keys/jobs-signing.key`` (root 0600,
folders 0700), made once and never replaced: a new key would orphan every record signed before. The
public key is published at ``<state_dir>/public/jobs-signing.pub`` (0644, base64 of its 32 bytes), where
stewards, the airlock and anyone checking a release offline read it.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from paitient.config import SiteConfig
from paitient.fsutil import atomic_write_text
from paitient.rules import training_record
from paitient.services.kit.secretfile import create_secret, read_secret

KEY_BYTES = 32
REMEDY = (
    "the runner makes its key at its first start; restore the site's key from its backup rather than making "
    "a new one, which no record signed before would match"
)


def private_key_path(site: SiteConfig) -> Path:
    return site.state_dir / "keys" / "jobs-signing.key"


def public_key_path(site: SiteConfig) -> Path:
    return site.state_dir / "public" / "jobs-signing.pub"


def ensure_signing_key(site: SiteConfig) -> Ed25519PrivateKey:
    """The signing key, made at the first call; its public half (re)published either way."""
    create_secret(site.state_dir, private_key_path(site), KEY_BYTES)
    key = load_signing_key(site)
    public = public_key_path(site)
    text = training_record.public_key_text(key.public_key())
    if not public.is_file() or public.read_text() != text:
        public.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(public.parent, 0o755)
        atomic_write_text(public, text, mode=0o644)
    return key


def load_signing_key(site: SiteConfig) -> Ed25519PrivateKey:
    seed = read_secret(private_key_path(site), min_bytes=KEY_BYTES, what="training-record signing key", remedy=REMEDY)
    return Ed25519PrivateKey.from_private_bytes(seed[:KEY_BYTES])


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A published public key (raises :class:`training_record.RecordInvalid` for one that is not)."""
    return training_record.public_key_from_bytes(path.read_bytes())
