"""``[[projects]]``: a project names its members (a directory group), datasets, data stewards and budgets."""

from __future__ import annotations

import math

from traitlets import Bunch, TraitError, validate

from paitient.config.errors import SettingError, must
from paitient.config.model import Model
from paitient.config.outputs import AIRLOCK_KINDS, EgressLimits
from paitient.config.traits import Names, Number, Overrides, Part, PartsByName, Text, WholeNumber
from paitient.config.workspace import NAME_RE


class Budget(Model):
    """A total differential-privacy budget of one dataset of a project (basic composition: the epsilons and
    deltas of all training runs on the dataset add up and may not exceed it)."""

    section = "budget"

    epsilon = Number(10.0, help="Total epsilon.").tag(config=True)

    @validate("epsilon")
    def _epsilon(self, proposal: Bunch) -> float:
        must(proposal.value > 0 and math.isfinite(proposal.value), "be positive and finite", proposal.value)
        return proposal.value

    delta = Number(1e-5, help="Total delta.").tag(config=True)

    @validate("delta")
    def _delta(self, proposal: Bunch) -> float:
        must(0 < proposal.value < 1, "lie between 0 and 1", proposal.value)
        return proposal.value


class Project(Model):
    """One [[projects]] table per project. Members see exactly the project's datasets, read-only, at
    /data/<project>/<dataset> in their kernels."""

    section = "projects"

    name = Text(
        "", help='Required. Lower-case letters, digits, "-" or "_", starting with a letter, at most 32 characters.'
    ).tag(config=True)

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
    ).tag(config=True)
    description = Text("", help="Shown to the project's members and stewards.").tag(config=True)
    datasets = Names(help="Dataset names, as published by `paitient ingest` for this project.").tag(config=True)

    @validate("datasets")
    def _datasets(self, proposal: Bunch) -> tuple[str, ...]:
        for dataset in proposal.value:
            must(NAME_RE.match(dataset) is not None, "be valid dataset names (like project names)", dataset)
        return proposal.value

    stewards = Names(
        help="Directory usernames of the project's data stewards: they review its airlock requests (never their own)."
    ).tag(config=True)
    approvals = WholeNumber(
        1, help="Independent steward approvals an airlock request needs before release: 1 or 2."
    ).tag(config=True)

    @validate("approvals")
    def _approvals(self, proposal: Bunch) -> int:
        must(proposal.value in (1, 2), "be 1 or 2", proposal.value)
        return proposal.value

    auto_release = Names(
        help=f"Airlock kinds ({', '.join(AIRLOCK_KINDS)}) released without review when every automatic check "
        "passed. Empty: every request is reviewed."
    ).tag(config=True)

    @validate("auto_release")
    def _auto_release(self, proposal: Bunch) -> tuple[str, ...]:
        for kind in proposal.value:
            if kind not in AIRLOCK_KINDS:
                raise TraitError(f"unknown kind {kind!r}; kinds: {', '.join(AIRLOCK_KINDS)}")
        return proposal.value

    budget = Part(
        Budget,
        help="The total differential-privacy budget of each dataset of the project, { epsilon, delta }.",
    ).tag(config=True)
    budgets = PartsByName(
        Budget, help="Per-dataset budgets that differ from budget: { dataset = { epsilon, delta }, ... }."
    ).tag(config=True)
    egress = Overrides(
        EgressLimits, help="The project's own [egress] limits, e.g. { daily_rows = 100 }; other keys: [egress]."
    ).tag(config=True)

    def check(self) -> None:
        for required in ("name", "group"):
            if not getattr(self, required):
                raise SettingError((), None, f"{required!r} is required")
        for dataset in self.budgets:
            if dataset not in self.datasets:
                raise SettingError(
                    (),
                    "budgets",
                    f"{dataset!r} is not one of the project's datasets ({', '.join(self.datasets) or 'none'})",
                )

    def budget_for(self, dataset: str) -> Budget:
        return self.budgets.get(dataset, self.budget)
