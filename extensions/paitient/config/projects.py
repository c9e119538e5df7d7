"""``[[projects]]``: a project names its members (a directory group), datasets, data stewards and budgets."""

from __future__ import annotations

import math
import re

from traitlets import Bunch, TraitError, validate

from paitient.config.errors import SettingError, must
from paitient.config.model import Model
from paitient.config.outputs import AIRLOCK_KINDS, AUTO_RELEASE_KINDS, EgressLimits
from paitient.config.traits import (
    NOT_NEGATIVE,
    SHARE,
    Choice,
    Names,
    Number,
    Overrides,
    Part,
    PartsByName,
    Rule,
    Text,
    WholeNumber,
)
from paitient.config.workspace import NAME_RE


class Budget(Model):
    """A total differential-privacy budget of one dataset of a project (basic composition: the epsilons and
    deltas of all training runs on the dataset add up and may not exceed it)."""

    section = "budget"

    epsilon = Number(
        10.0, rule=Rule("be positive and finite", lambda v: v > 0 and math.isfinite(v)), help="Total epsilon."
    )

    delta = Number(1e-5, rule=Rule("lie between 0 and 1", lambda v: 0 < v < 1), help="Total delta.")


class Project(Model):
    """One [[projects]] table per project. Members see exactly the project's datasets, read-only, at
    /data/<project>/<dataset> in their kernels."""

    section = "projects"

    name = Text(
        "", help='Required. Lower-case letters, digits, "-" or "_", starting with a letter, at most 32 characters.'
    )

    @validate("name")
    def _name(self, proposal: Bunch) -> str:
        ok = NAME_RE.match(proposal.value) is not None
        must(
            ok,
            "be lower-case letters, digits, '-' or '_', starting with a letter, at most 32 characters",
            proposal.value,
        )
        return proposal.value

    group = Text(
        "",
        help="Required. The directory group whose members are the project's researchers: a full DN, or a group "
        "name (cn) under [directory] group_base.",
    )
    description = Text("", help="Shown to the project's members and stewards.")
    datasets = Names(help="Dataset names, as published by `paitient ingest` for this project.")

    @validate("datasets")
    def _datasets(self, proposal: Bunch) -> tuple[str, ...]:
        for dataset in proposal.value:
            must(NAME_RE.match(dataset) is not None, "be valid dataset names (like project names)", dataset)
        return proposal.value

    stewards = Names(
        help="Directory usernames of the project's data stewards: they review its airlock requests (never their own)."
    )
    approvals = WholeNumber(
        1,
        rule=Rule("be 1 or 2", lambda v: v in (1, 2)),
        help="Independent steward approvals an airlock request needs before release: 1 or 2.",
    )

    auto_release = Names(
        help=f"Airlock kinds ({', '.join(AUTO_RELEASE_KINDS)}) released without review when every automatic "
        "check passed; tables only counts of the whole dataset (no filter) that the airlock recomputed from their "
        "recipe, weights only when a training job's runner certified them, of a graph in auto_release_graphs "
        "(figures always go to a steward). Empty: every request is "
        "reviewed."
    )

    auto_release_graphs = Names(
        help="SHA-256 of the model graphs (as a training record names them) whose certified weights may be "
        "released without review where auto_release holds weights, beside those the project's stewards approve "
        "on a request's page after reading its graph. A graph's numbers and structure steer what training writes "
        "into the weights, so weights of any other graph go to a steward. Empty: none.",
    )

    member_share = Number(
        1.0,
        rule=SHARE,
        help="The share of each dataset's epsilon and delta budgets one member of the project may have spent and "
        "reserved, "
        "all of her runs and training jobs together (in-kernel trainings and the runner's alike). Below 1, "
        "no member can take, or hold in a long-lived reservation, what the others need: with 4 members, 0.25 "
        "gives each an equal part. 1: the first to ask may use all that is left.",
    )

    auto_release_per_day = WholeNumber(
        10,
        rule=NOT_NEGATIVE,
        help="Outputs one researcher of the project may have released without review in any 24 hours; past it, "
        "an output that would have left automatically waits for a steward, saying so. What leaves automatically "
        "was chosen by the researcher's code (a recipe's dataset, grouping and format; a job's settings), a few "
        "bits a release that no steward reads, so this bounds that channel. 0: every output is reviewed.",
    )

    @validate("auto_release_graphs")
    def _auto_release_graphs(self, proposal: Bunch) -> tuple[str, ...]:
        for sha in proposal.value:
            must(re.fullmatch(r"[0-9a-f]{64}", sha) is not None, "be SHA-256 digests (64 lowercase hex digits)", sha)
        return proposal.value

    @validate("auto_release")
    def _auto_release(self, proposal: Bunch) -> tuple[str, ...]:
        for kind in proposal.value:
            if kind not in AIRLOCK_KINDS:
                raise TraitError(f"unknown kind {kind!r}; kinds: {', '.join(AIRLOCK_KINDS)}")
            if kind not in AUTO_RELEASE_KINDS:
                raise TraitError(
                    f"{kind!r} outputs are always reviewed by a steward; only {', '.join(AUTO_RELEASE_KINDS)} can be "
                    "released automatically"
                )
        return proposal.value

    self_reported_weights = Choice(
        ("refuse", "two-person"),
        "refuse",
        help="Model weights trained in a researcher's kernel (paitient.dp), whose DP record the researcher's own "
        "code reported:\n"
        '- "refuse": the airlock refuses them; weights leave only from certified training jobs (paitient.jobs)\n'
        '- "two-person": they may leave after two independent steward approvals, whatever approvals says; '
        "self_reported_reason must say why the project allows them",
    )
    self_reported_reason = Text(
        "",
        help='Required with self_reported_weights = "two-person": why the project releases weights that no runner '
        "certified. Shown to the stewards on every such request.",
    )

    table_labels = Names(
        help="Text a released table may hold besides the categories and column names the catalogue lists for the "
        'project\'s datasets (e.g. ["Stage I", "complete response"]): the airlock refuses any other text in a '
        "table's cells and headers as free text."
    )

    budget = Part(
        Budget,
        help="The total differential-privacy budget of each dataset of the project, { epsilon, delta }.",
    )
    budgets = PartsByName(
        Budget, help="Per-dataset budgets that differ from budget: { dataset = { epsilon, delta }, ... }."
    )
    egress = Overrides(
        EgressLimits, help="The project's own [egress] limits, e.g. { daily_rows = 100 }; other keys: [egress]."
    )

    def check(self) -> None:
        for required in ("name", "group"):
            if not getattr(self, required):
                raise SettingError((), None, f"{required!r} is required")
        if self.self_reported_weights == "two-person":
            if len(self.stewards) < 2:
                raise SettingError(
                    (),
                    "self_reported_weights",
                    '"two-person" needs two approvals from different stewards: name at least two in stewards',
                )
            if not self.self_reported_reason.strip():
                raise SettingError(
                    (),
                    "self_reported_reason",
                    'is required with self_reported_weights = "two-person": write why the project releases '
                    "weights that no runner certified",
                )
        for dataset in self.budgets:
            if dataset not in self.datasets:
                raise SettingError(
                    (),
                    "budgets",
                    f"{dataset!r} is not one of the project's datasets ({', '.join(self.datasets) or 'none'})",
                )

    def budget_for(self, dataset: str) -> Budget:
        return self.budgets.get(dataset, self.budget)
