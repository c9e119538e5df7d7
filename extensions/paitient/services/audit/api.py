"""What the audit service offers others: the hub scope of its web view.

The service (:mod:`paitient.services.audit.service`) and the view (:mod:`paitient.services.audit.web`) both
import it; root-side processes write records with :func:`paitient.services.audit.emit`, user-side ones send
them through :mod:`paitient.server.audit`.
"""

from __future__ import annotations

READ_SCOPE = "custom:audit:read"
"""The hub scope of the web view (pages and JSON)."""


def custom_scopes() -> dict[str, dict[str, str]]:
    """For ``c.JupyterHub.custom_scopes``; grant the scope (with ``access:services!service=audit``) to
    the steward and admin roles."""
    return {READ_SCOPE: {"description": "Read the audit trail in the audit service's web view."}}


def role_scopes() -> list[str]:
    """Scopes a role needs to open the audit web view."""
    return [READ_SCOPE, "access:services!service=audit"]
