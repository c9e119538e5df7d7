"""The airlock's scopes and settings, shared by the service, its web pages and the hub configuration."""

from __future__ import annotations

from traitlets import Float, Integer
from traitlets.config import Configurable

from paitient.config import Airlock, site_trait

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
    """Knobs of the airlock service (``paitient service airlock --AirlockSettings.<name>=...``).

    Every knob but ``port`` is a site setting of [airlock]: its default, help and rule come from there, and
    :func:`paitient.services.airlock.service.settings_for` fills it from the site file."""

    port = Integer(
        0,
        help="Loopback port of the review pages; 0: the port in $JUPYTERHUB_SERVICE_URL, "
        "or a free one chosen when the hub's service entry is made.",
    ).tag(config=True)
    max_bytes = site_trait(Airlock, "max_bytes")
    min_count = site_trait(Airlock, "min_count")
    nk_n = site_trait(Airlock, "nk_n")
    nk_k = site_trait(Airlock, "nk_k")
    p_ratio = site_trait(Airlock, "p_ratio")
    zeros_disclosive = site_trait(Airlock, "zeros_disclosive")
    requests_per_day = site_trait(Airlock, "requests_per_day")
    max_table_pages = site_trait(Airlock, "max_table_pages")
    max_figure_side = site_trait(Airlock, "max_figure_side")
    mia_max_auc = site_trait(Airlock, "mia_max_auc")
    mia_max_advantage = site_trait(Airlock, "mia_max_advantage")
    audit_account = site_trait(Airlock, "audit_account")
    audit_timeout = site_trait(Airlock, "audit_timeout")
    check_max_bytes = Integer(
        16 << 20,
        help="Largest file a check before a request (airlock.check) takes, bytes; a larger one is checked only "
        "when its request is filed.",
    ).tag(config=True)
    check_timeout = Float(
        20.0,
        help="Seconds a check before a request may take before its caller is told it timed out.",
    ).tag(config=True)
    check_concurrency = Integer(
        2,
        help="Checks before a request the service runs at once (one per account); more are refused as busy.",
    ).tag(config=True)
