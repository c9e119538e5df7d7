"""The airlock's scopes and settings, shared by the service, its web pages and the hub configuration."""

from __future__ import annotations

from traitlets import Bool, Float, Integer, Unicode
from traitlets.config import Configurable

SCOPE_REQUEST = "custom:airlock:request"
SCOPE_REVIEW = "custom:airlock:review"
SCOPE_DOWNLOAD = "custom:airlock:download"


def custom_scopes() -> dict[str, dict[str, str]]:
    """The airlock's scopes, for ``JupyterHub.custom_scopes``."""
    return {
        SCOPE_REQUEST: {"description": "Ask the airlock to release an output of one's own projects."},
        SCOPE_REVIEW: {"description": "Review airlock requests of the projects one is a steward of."},
        SCOPE_DOWNLOAD: {"description": "Download released outputs of one's own projects."},
    }


def role_scopes() -> dict[str, list[str]]:
    """Scopes the hub's roles need for the airlock (the access scope lets a user sign in to the service)."""
    access = "access:services!service=airlock"
    return {"researcher": [access, SCOPE_REQUEST, SCOPE_DOWNLOAD], "steward": [access, SCOPE_REVIEW]}


class AirlockSettings(Configurable):
    """Knobs of the airlock service (``paitient service airlock --AirlockSettings.<name>=...``)."""

    port = Integer(
        0,
        help="Loopback port of the review pages; 0: the port in $JUPYTERHUB_SERVICE_URL, "
        "or a free one chosen when the hub's service entry is made.",
    ).tag(config=True)
    max_bytes = Integer(512 << 20, help="Largest file the airlock takes (bytes).").tag(config=True)
    min_count = Integer(10, help="Minimum number of individuals behind a table cell.").tag(config=True)
    nk_n = Integer(2, help="Dominance rule: the n largest contributors ...").tag(config=True)
    nk_k = Float(0.9, help="... may make up at most this share of a cell's total.").tag(config=True)
    p_ratio = Float(
        0.1, help="p-ratio rule: the smaller contributors must make up at least this share of the largest."
    ).tag(config=True)
    zeros_disclosive = Bool(True, help="Treat zero cells as disclosive.").tag(config=True)
    mia_max_auc = Float(0.6, help="The membership-inference check fails above this attack AUC.").tag(config=True)
    mia_max_advantage = Float(0.2, help="... or above this attack advantage (max TPR - FPR).").tag(config=True)
    audit_account = Unicode(
        "nobody", help="Unprivileged account the membership-inference audit runs as, in bubblewrap."
    ).tag(config=True)
    audit_timeout = Float(600.0, help="Seconds the membership-inference audit may take.").tag(config=True)
