"""The airlock's request life cycle as pure functions: which state changes are allowed, what a decision does.

::

    submitted -> checking -> in_review -> released | rejected | returned

``returned`` means the researcher must change the output and submit a new request; ``released``,
``rejected`` and ``returned`` are final. Nothing here touches storage: the store calls these functions
inside its transaction and records what they decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from paitient.config.outputs import AUTO_RELEASE_KINDS

SUBMITTED = "submitted"
CHECKING = "checking"
IN_REVIEW = "in_review"
RELEASED = "released"
REJECTED = "rejected"
RETURNED = "returned"

STATES = (SUBMITTED, CHECKING, IN_REVIEW, RELEASED, REJECTED, RETURNED)
FINAL = frozenset({RELEASED, REJECTED, RETURNED})

TRANSITIONS: dict[str, frozenset[str]] = {
    SUBMITTED: frozenset({CHECKING}),
    # A restart while checking runs the checks again from the start.
    CHECKING: frozenset({IN_REVIEW, CHECKING}),
    IN_REVIEW: frozenset({RELEASED, REJECTED, RETURNED}),
    RELEASED: frozenset(),
    REJECTED: frozenset(),
    RETURNED: frozenset(),
}

ACTIONS = ("approve", "reject", "return")
_ACTION_STATE = {"reject": REJECTED, "return": RETURNED}


class TransitionError(ValueError):
    """A state change or a decision that the rules do not allow; the message says why.

    ``status`` is the HTTP status that fits: 400 malformed, 403 not allowed for this person, 409 not in
    this state.
    """

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


def check_transition(current: str, new: str) -> None:
    """Raise :class:`TransitionError` unless ``current -> new`` is an allowed step."""
    if current not in TRANSITIONS:
        raise TransitionError(f"unknown state {current!r}; states: {', '.join(STATES)}")
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (the request is final)"
        raise TransitionError(f"a request in state {current!r} cannot move to {new!r}; allowed: {allowed}")


MIN_OVERRIDE = 20
"""Characters an override reason needs at least: a sentence, not a tick."""


@dataclass(frozen=True)
class Decision:
    """What a steward's decision does: the new state (``None``: stays in review, waiting for another approval)."""

    new_state: str | None
    approvals: int
    """Distinct approvals counted after this decision."""
    needed: int
    override: str = ""
    """The reason this approval gives for releasing despite failed checks ("" when none failed)."""
    confirms: str = ""
    """The earlier approval's override reason this one confirmed (two-person rule)."""


def decide(
    *,
    state: str,
    requester: str,
    reviewer: str,
    action: str,
    comment: str,
    may_review: bool,
    earlier_approvers: Iterable[str],
    approvals_needed: int,
    failed_checks: Sequence[str] = (),
    override: str = "",
    earlier_override: str = "",
    confirm_override: bool = False,
) -> Decision:
    """Apply one steward decision to a request in review, or raise :class:`TransitionError` saying why not.

    Rules: only a steward of the request's project decides; nobody decides on their own request; every
    decision carries a comment; an approval counts once per steward, and the request is released when
    ``approvals_needed`` distinct stewards approved; a rejection or return ends the review at once.

    Overrides: approving a request whose ``failed_checks`` are not empty needs an ``override`` reason of at
    least :data:`MIN_OVERRIDE` characters. When an earlier approval overrode (``earlier_override``), a
    later approval counts only if it confirms that reason (``confirm_override``) or gives its own.
    """
    if action not in ACTIONS:
        raise TransitionError(f"unknown decision {action!r}; choose one of: {', '.join(ACTIONS)}", 400)
    if not may_review:
        raise TransitionError(f"{reviewer} is not a steward of this request's project and cannot decide on it", 403)
    if reviewer == requester:
        raise TransitionError("nobody reviews their own request: another steward of the project must decide", 403)
    if not comment or not comment.strip():
        raise TransitionError("a decision needs a comment that tells the researcher why", 400)
    if state != IN_REVIEW:
        raise TransitionError(f"the request is {state!r}, not in review; there is nothing to decide")
    if approvals_needed not in (1, 2):
        raise TransitionError(f"approvals needed must be 1 or 2, got {approvals_needed}", 500)
    approvers = set(earlier_approvers)
    if action != "approve":
        return Decision(new_state=_ACTION_STATE[action], approvals=len(approvers), needed=approvals_needed)
    if reviewer in approvers:
        raise TransitionError(
            f"{reviewer} already approved this request; it needs an independent approval from another steward"
        )
    override = override.strip()
    confirms = ""
    if earlier_override and failed_checks:
        if not (confirm_override or override):
            raise TransitionError(
                f"an earlier approval overrode failed checks ({earlier_override}): confirm that override, or give "
                "your own reason, to approve",
                400,
            )
        confirms = earlier_override if confirm_override else ""
    if failed_checks and not confirms and len(override) < MIN_OVERRIDE:
        raise TransitionError(
            f"the check(s) {', '.join(failed_checks)} failed: approving needs an override reason of at least "
            f"{MIN_OVERRIDE} characters saying why this output is safe to release anyway; or return or reject it",
            400,
        )
    approvers.add(reviewer)
    new_state = RELEASED if len(approvers) >= approvals_needed else None
    return Decision(
        new_state=new_state,
        approvals=len(approvers),
        needed=approvals_needed,
        override=override if failed_checks else "",
        confirms=confirms,
    )


REFUSE_SELF_REPORTED = "refuse"
TWO_PERSON = "two-person"


def self_reported_refusal(project: str) -> str:
    """Why project ``project`` takes no weights trained in a kernel, and what to do instead."""
    return (
        f"project {project} does not release self-reported weights (trained in the kernel with paitient.dp, whose "
        "DP record your own code reported): train the model as a certified job with paitient.jobs.submit(...) and "
        "request the job, airlock.request(job, justification=...); a project's stewards can allow self-reported "
        'weights with two approvals and a written reason (self_reported_weights = "two-person")'
    )


def approvals_for(
    *, project: str, kind: str, certified: bool, project_approvals: int, self_reported_policy: str
) -> int:
    """Independent approvals a request needs: the project's number, except for weights no runner certified,
    which need two under the two-person policy and are refused (:class:`TransitionError`, 403) otherwise."""
    if kind != "weights" or certified:
        return project_approvals
    if self_reported_policy == TWO_PERSON:
        return 2
    raise TransitionError(self_reported_refusal(project), 403)


def overall_status(statuses: Iterable[str]) -> str:
    """Combine check outcomes: any ``fail`` fails, else any ``review``/``error`` needs review, else ``pass``."""
    statuses = list(statuses)
    if not statuses:
        return "review"
    if "fail" in statuses:
        return "fail"
    if any(s != "pass" for s in statuses):
        return "review"
    return "pass"


def auto_release_refusal(
    kind: str,
    auto_release_kinds: Iterable[str],
    statuses: Iterable[str],
    *,
    certified: bool = False,
    recomputed: bool | str = False,
    own_constants: bool = False,
    approved_graph: bool = False,
) -> str | None:
    """Why a request is not released automatically, or ``None`` when it is. ``recomputed``: the airlock
    recomputed a table from its recipe and may release that (``True``), or the reason it may not (a string).
    ``own_constants``: the signed record of certified weights carries preprocessing constants the researcher
    chose (not the catalogue's), which leave with it: a steward reads them. ``approved_graph``: the job trained
    a graph the project's stewards approved for automatic release (``auto_release_graphs``).

    Only kinds the stewards allowed, and only when every automatic check passed. A table's numbers are the
    kernel's unless the airlock recomputed them: only a table whose recipe check passed (``recomputed``)
    leaves without a steward, since one of made-up counts (data written as numbers above the minimum count)
    passes every check of a table alone. Weights only when a training runner signed them; figures and other
    kinds never (no check of theirs passes on its own)."""
    if kind not in AUTO_RELEASE_KINDS or kind not in set(auto_release_kinds):
        return f"the project does not release {kind} outputs automatically"
    if kind == "weights" and not certified:
        return "weights are released automatically only when a training job's runner signed them"
    if kind == "weights" and not approved_graph:
        return (
            "the model's graph is not one the project's stewards approved for automatic release "
            "(auto_release_graphs): its numbers and structure steer what training writes into the weights, so "
            "a steward reads it"
        )
    if kind == "weights" and own_constants:
        return (
            "the signed record carries preprocessing constants the researcher chose (not the catalogue's), "
            "which leave with the weights: a steward reads them"
        )
    if kind == "table" and recomputed is not True:
        if isinstance(recomputed, str) and recomputed:
            return recomputed
        return (
            "a table is released automatically only when the airlock recomputed it from its recipe; "
            "without one its numbers are the kernel's, so a steward reviews it"
        )
    if overall_status(statuses) != "pass":
        return "not every automatic check passed"
    return None
