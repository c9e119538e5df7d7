"""User-side sender: a user's server or kernel reports an event to the audit service.

The service decides who the sender is (peer credentials), which actions a user-side process may report,
and how much of the details it keeps; this module only packs the request.
"""

from __future__ import annotations

import os
from typing import Any

from paitient.channel import ChannelError, ServiceClient
from paitient.rules.records import AuditError, cap_details

# Keep the request under the channel's 1 MiB limit; the service cuts further (see [audit] in the site config).
_CLIENT_STRING_CHARS = 256 * 1024
_CLIENT_DETAILS_BYTES = 900 * 1024


class AuditClient(ServiceClient):
    """The user side's one call to the audit service, ``record``."""

    service = "audit"
    default_timeout = 10.0
    outside_hint = "The workspace sets it for every user server and kernel"

    def record(
        self, action: str, *, object: str = "", outcome: str = "ok", details: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record ``action``; the answer is ``{"seq": ..., "hash": ...}`` of the record the service wrote."""
        args = {
            "action": action,
            "object": object,
            "outcome": outcome,
            "details": cap_details(details or {}, string_limit=_CLIENT_STRING_CHARS, total_limit=_CLIENT_DETAILS_BYTES),
        }
        return self.call("record", args)


def send(
    run_dir: str | os.PathLike[str],
    *,
    action: str,
    object: str = "",
    outcome: str = "ok",
    details: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Record ``action`` through ``<run_dir>/audit.sock``; return ``{"seq": ..., "hash": ...}``.

    Raises :class:`AuditError` if the service refuses the event or cannot be reached; the message says why
    and ``.code`` is the service's code (``unavailable`` when it is not running, ``timeout`` when it did
    not answer in time: a caller that must not act unrecorded, such as the cell-capturing server
    extension, should refuse to go on).
    """
    try:
        return AuditClient(run_dir, timeout=timeout).record(action, object=object, outcome=outcome, details=details)
    except ChannelError as e:
        # e.code: "forbidden", "bad_request", "unavailable", "timeout", ...
        raise AuditError(f"the audit service did not record {action!r}: {e}", e.code) from e
