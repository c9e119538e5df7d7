"""What may leave the workspace: ``[egress]`` (what a researcher may see) and ``[airlock]`` (what is exported)."""

from __future__ import annotations

from traitlets import Bunch, validate

from paitient.config.errors import must
from paitient.config.model import Model
from paitient.config.traits import Flag, Number, Text, WholeNumber

AIRLOCK_KINDS = ("table", "figure", "weights", "other")


class EgressLimits(Model):
    """What one researcher may see of the data through the browser: every channel from the workspace to the
    browser (kernel output, the contents API, API responses) counts; JupyterLab's own static assets do not.

    A project may set its own limits with `egress = { ... }` (same keys) in its [[projects]] table; a user in
    several projects gets the strictest of each limit (for every limit here, smaller is stricter).
    """

    section = "egress"

    max_rows_per_output = WholeNumber(
        20,
        help="An output (one execution's output, one file, one notebook) that reveals more distinct rows of a "
        "dataset than this is withheld. 0: no row may be shown.",
    ).tag(config=True)
    daily_rows = WholeNumber(
        200, help="Distinct dataset rows one user may see per day, across all channels. 0: none."
    ).tag(config=True)
    fail_closed_bytes = WholeNumber(
        4096,
        help="When the row matcher or the audit trail cannot be reached, outputs larger than this many bytes are "
        "withheld. 0: all are withheld.",
    ).tag(config=True)

    @validate("max_rows_per_output", "daily_rows", "fail_closed_bytes")
    def _not_negative(self, proposal: Bunch) -> int:
        must(proposal.value >= 0, "be 0 or a positive whole number", proposal.value)
        return proposal.value

    daily_bytes = WholeNumber(
        20_000_000,
        help="Bytes one user may receive per day from the workspace, across all channels (kernel output, "
        "contents, API responses; not JupyterLab's own static assets).",
    ).tag(config=True)
    contents_bytes = WholeNumber(
        2_000_000,
        help="Largest text file or notebook the contents API sends. ([server] contents_cap_bytes is the largest "
        "file it opens at all.)",
    ).tag(config=True)

    @validate("daily_bytes", "contents_bytes")
    def _positive(self, proposal: Bunch) -> int:
        must(proposal.value > 0, "be a positive whole number", proposal.value)
        return proposal.value

    @classmethod
    def strictest(cls, limits: list[EgressLimits]) -> EgressLimits:
        """Each limit at its smallest over ``limits`` (at least one)."""
        return cls(**{name: min(getattr(lim, name) for lim in limits) for name in cls.settings()})


class Airlock(Model):
    """The automatic checks every export request goes through before a steward sees it (the airlock is the
    only way out of the workspace)."""

    section = "airlock"

    max_bytes = WholeNumber(512 << 20, help="Largest file the airlock takes, bytes.").tag(config=True)
    min_count = WholeNumber(10, help="Tables: every cell must stand for at least this many individuals.").tag(
        config=True
    )
    nk_n = WholeNumber(
        2, help="Dominance rule: the nk_n largest contributors to a cell may make up at most nk_k of its total."
    ).tag(config=True)

    @validate("max_bytes", "min_count", "nk_n")
    def _positive(self, proposal: Bunch) -> int:
        must(proposal.value > 0, "be a positive whole number", proposal.value)
        return proposal.value

    nk_k = Number(
        0.9, help="Dominance rule: the share of a cell's total the nk_n largest contributors may make up."
    ).tag(config=True)
    p_ratio = Number(
        0.1,
        help="p-ratio rule: the contributors after the largest two must make up at least this share of the largest.",
    ).tag(config=True)

    @validate("nk_k", "p_ratio", "mia_max_advantage")
    def _share(self, proposal: Bunch) -> float:
        must(0 < proposal.value <= 1, "lie in (0, 1]", proposal.value)
        return proposal.value

    zeros_disclosive = Flag(
        True, help="Treat zero cells as disclosive (a zero tells that nobody in the group has the property)."
    ).tag(config=True)
    mia_max_auc = Number(
        0.6,
        help="Model weights: a loss-threshold membership-inference attack (training rows against held-out rows) is "
        "run on the model; the check fails above this attack AUC.",
    ).tag(config=True)

    @validate("mia_max_auc")
    def _auc(self, proposal: Bunch) -> float:
        must(0.5 < proposal.value <= 1, "lie in (0.5, 1] (0.5 is guessing)", proposal.value)
        return proposal.value

    mia_max_advantage = Number(
        0.2, help="Model weights: the check also fails above this attack advantage (max TPR - FPR)."
    ).tag(config=True)
    audit_account = Text(
        "nobody", help="Unprivileged account the membership-inference attack runs as, in the kernels' sandbox."
    ).tag(config=True)
    audit_timeout = Number(600.0, help="Seconds the membership-inference attack may take.").tag(config=True)

    @validate("audit_timeout")
    def _timeout(self, proposal: Bunch) -> float:
        must(proposal.value > 0, "be a positive number of seconds", proposal.value)
        return proposal.value
