"""What may leave the workspace: ``[egress]`` (what a researcher may see) and ``[airlock]`` (what is exported)."""

from __future__ import annotations

from paitient.config.model import Model
from paitient.config.traits import (
    NOT_NEGATIVE,
    POSITIVE,
    SHARE,
    WORKER_ACCOUNT,
    Choice,
    Flag,
    Number,
    Rule,
    Text,
    WholeNumber,
)

AIRLOCK_KINDS = ("table", "figure", "weights", "other")
AUTO_RELEASE_KINDS = ("table", "figure", "weights")
"""Kinds a project may release without review (weights only when the training runner certified them)."""


class EgressLimits(Model):
    """What one researcher may see of the data through the browser: every channel from the workspace to the
    browser (kernel output, the contents API, API responses) counts; JupyterLab's own static assets do not.

    A project may set its own limits with `egress = { ... }` (same keys) in its [[projects]] table; a user in
    several projects gets the strictest of each limit (for every limit here, smaller is stricter).
    """

    section = "egress"

    max_rows_per_output = WholeNumber(
        20,
        rule=NOT_NEGATIVE,
        help="An output (one execution's output, one file, one notebook) that reveals more distinct rows of a "
        "dataset than this is withheld. 0: no row may be shown.",
    )
    daily_rows = WholeNumber(
        200, rule=NOT_NEGATIVE, help="Distinct dataset rows one user may see per day, across all channels. 0: none."
    )
    fail_closed_bytes = WholeNumber(
        4096,
        rule=NOT_NEGATIVE,
        help="When the row matcher or the audit trail cannot be reached, outputs larger than this many bytes are "
        "withheld. 0: all are withheld.",
    )
    unchecked_bytes = WholeNumber(
        65_536,
        rule=NOT_NEGATIVE,
        help="While outputs cannot be checked, the small ones (see fail_closed_bytes) that pass unchecked may add "
        "up to this many bytes in all: for each user's server when the egress service cannot be reached, for each "
        "user when the row matcher or the audit trail cannot. Reconnecting or a new cell does not renew it; once "
        "it is spent every output is withheld until outputs can be checked again, which renews it. 0: none pass.",
    )

    daily_bytes = WholeNumber(
        20_000_000,
        rule=POSITIVE,
        help="Bytes one user may receive per day from the workspace, across all channels (kernel output, "
        "contents, API responses; not JupyterLab's own static assets).",
    )
    contents_bytes = WholeNumber(
        2_000_000,
        rule=POSITIVE,
        help="Largest text file or notebook the contents API sends. ([server] contents_cap_bytes is the largest "
        "file it opens at all.)",
    )

    @classmethod
    def strictest(cls, limits: list[EgressLimits]) -> EgressLimits:
        """Each limit at its smallest over ``limits`` (at least one)."""
        return cls(**{name: min(getattr(lim, name) for lim in limits) for name in cls.settings()})


class Airlock(Model):
    """The automatic checks every export request goes through before a steward sees it (the airlock is the
    only way out of the workspace)."""

    section = "airlock"

    max_bytes = WholeNumber(512 << 20, rule=POSITIVE, help="Largest file the airlock takes, bytes.")
    min_count = WholeNumber(10, rule=POSITIVE, help="Tables: every cell must stand for at least this many individuals.")
    nk_n = WholeNumber(
        2,
        rule=POSITIVE,
        help="Dominance rule: the nk_n largest contributors to a cell may make up at most nk_k of its total.",
    )

    nk_k = Number(
        0.9, rule=SHARE, help="Dominance rule: the share of a cell's total the nk_n largest contributors may make up."
    )
    p_ratio = Number(
        0.1,
        rule=SHARE,
        help="p-ratio rule: the contributors after the largest two must make up at least this share of the largest.",
    )

    zeros_disclosive = Flag(
        True, help="Treat zero cells as disclosive (a zero tells that nobody in the group has the property)."
    )
    requests_per_day = WholeNumber(
        50,
        rule=POSITIVE,
        help="Requests one researcher may file in any 24 hours (all projects, whatever became of them); the next "
        "is refused with the time it can be filed. Each request carries a few bits its checks' outcomes and its "
        "rounded size and times tell its requester's browser, so this bounds that channel too.",
    )
    max_table_pages = WholeNumber(
        50,
        rule=POSITIVE,
        help="Most preview pages (of 200 rows by 30 columns) a released table may fill. A steward approves a table "
        "only once they have opened every page, so a longer one is refused when it is filed, and by airlock.check, "
        "saying to release an aggregate or to split it.",
    )
    max_figure_side = WholeNumber(
        2000,
        rule=POSITIVE,
        help="Most pixels a released figure may have in width and in height. A steward sees a figure at full size, "
        "one pixel of it to one of the page (a figure shown shrunk hides detail, a block of data among its bars), "
        "so a larger one is refused when it is filed, and by airlock.check, saying to save it smaller.",
    )
    mia_max_auc = Number(
        0.6,
        rule=Rule("lie in (0.5, 1] (0.5 is guessing)", lambda v: 0.5 < v <= 1),
        help="Model weights: a loss-threshold membership-inference attack (training rows against held-out rows) is "
        "run on the model; the check fails above this attack AUC.",
    )

    mia_max_advantage = Number(
        0.2, rule=SHARE, help="Model weights: the check also fails above this attack advantage (max TPR - FPR)."
    )
    audit_account = Text(
        "paitient-audit",
        rule=WORKER_ACCOUNT,
        help="Dedicated system account the membership-inference audit runs the model as, in the kernels' sandbox "
        "(made at the first audit if missing; never nobody or another shared account).",
    )
    audit_timeout = Number(
        600.0,
        rule=Rule("be a positive number of seconds", lambda v: v > 0),
        help="Seconds the membership-inference attack may take.",
    )


class Jobs(Model):
    """Certified training jobs: a root-side runner trains a researcher's model (sent as a graph, never as code)
    under differential privacy and signs the record the weights are released with."""

    section = "jobs"

    concurrency = WholeNumber(1, rule=POSITIVE, help="Jobs trained at the same time.")
    max_per_user = WholeNumber(
        4,
        rule=Rule("be a whole number from 1 to 1000", lambda v: 1 <= v <= 1000),
        help="Jobs one account may have queued or running at once (1 to 1000); a further submission is refused, "
        "saying to wait for one to end or cancel one (jobs.cancel). Workers take the next job from the account "
        "with the fewest running, then the one served longest ago, so one account's backlog does not hold up "
        "another's.",
    )
    account = Text(
        "paitient-jobs",
        rule=WORKER_ACCOUNT,
        help="Dedicated system account the training runs as, in the kernels' sandbox (made at the first job if "
        "missing; never nobody or another shared account, nor [airlock] audit_account).",
    )
    timeout = Number(
        3600.0, rule=Rule("be a positive number of seconds", lambda v: v > 0), help="Seconds one job may train."
    )
    memory_mb = WholeNumber(8192, rule=POSITIVE, help="Memory one job may use, in MiB.")
    device = Choice(
        ("auto", "cpu", "cuda"),
        "auto",
        help='Where a job trains: "auto" (CUDA when torch in the sandbox sees a GPU, the CPU otherwise), '
        '"cpu" or "cuda" (the job fails when no GPU is seen).',
    )
