"""TLS between a pod's relay and the services' gateway: the pods' calls cross the cluster's network.

The gateway presents a certificate (a Secret of the services' pod); each relay trusts only the certificate
authority it is given (a file its container mounts) and checks the gateway's name against it. TLS 1.3 only:
both ends are this software, so nothing older needs to be spoken. The pod's token, which says who calls,
travels inside the encrypted connection.
"""

from __future__ import annotations

import ssl


class TLSSetupError(ValueError):
    """A certificate, key or authority cannot be used; the message says which and why."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The gateway's side: its certificate chain and key, TLS 1.3 only, no client certificate asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TLSSetupError(
            f"cannot use the gateway's certificate {cert} with the key {key}: {getattr(e, 'strerror', None) or e}; "
            "give a PEM certificate chain and its unencrypted PEM key"
        ) from None
    return ctx


def client_context(authority: str) -> ssl.SSLContext:
    """A relay's side: trusts ``authority`` (PEM) alone, not the system's store, and checks the name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=authority)
    except (OSError, ssl.SSLError) as e:
        raise TLSSetupError(
            f"cannot use {authority} as the gateway's certificate authority: {getattr(e, 'strerror', None) or e}; "
            "give the PEM certificate of the authority that signed the gateway's certificate"
        ) from None
    return ctx
