"""Budget arithmetic of the privacy ledger: plain functions, no storage.

Composition is *basic*: the epsilons of all runs on a dataset add up, and so do their deltas. That is
loose (advanced or PRV composition across runs would be tighter) but always valid, whatever mechanism
each run used, and easy for a steward to check by hand. A run counts against the budget:

- while it is **reserved**: with the epsilon and delta it reserved (it may still spend all of it);
- once **settled**: with the epsilon and delta its accountant reported (never more than it reserved);
- once **lost** (its kernel died before settling): with everything it reserved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from paitient.config import Budget

STATES = ("reserved", "settled", "lost")
REL_TOL = 1e-9
"""Floating-point slack when comparing sums with a total (a budget of 1.0 taken as ten runs of 0.1)."""


class BudgetExceeded(Exception):
    """A reservation would take a dataset over its budget; the message gives the numbers."""


@dataclass(frozen=True)
class Entry:
    """What the arithmetic needs to know about one run."""

    state: str
    epsilon: float
    """Reserved epsilon."""
    delta: float
    epsilon_spent: float | None = None
    delta_spent: float | None = None


@dataclass(frozen=True)
class Usage:
    spent_epsilon: float = 0.0
    spent_delta: float = 0.0
    reserved_epsilon: float = 0.0
    reserved_delta: float = 0.0

    @property
    def epsilon(self) -> float:
        return self.spent_epsilon + self.reserved_epsilon

    @property
    def delta(self) -> float:
        return self.spent_delta + self.reserved_delta


def charge(entry: Entry) -> tuple[float, float, float, float]:
    """(spent epsilon, spent delta, reserved epsilon, reserved delta) that one run counts for."""
    if entry.state == "reserved":
        return 0.0, 0.0, entry.epsilon, entry.delta
    if entry.state == "lost":
        return entry.epsilon, entry.delta, 0.0, 0.0
    if entry.state == "settled":
        return float(entry.epsilon_spent or 0.0), float(entry.delta_spent or 0.0), 0.0, 0.0
    raise ValueError(f"unknown ledger state {entry.state!r}; one of {', '.join(STATES)}")


def usage(entries: Iterable[Entry]) -> Usage:
    """Basic composition: sum what every run counts for."""
    se = sd = re = rd = 0.0
    for e in entries:
        a, b, c, d = charge(e)
        se, sd, re, rd = se + a, sd + b, re + c, rd + d
    return Usage(se, sd, re, rd)


def left(total: Budget, used: Usage) -> tuple[float, float]:
    """(epsilon, delta) still available; never below zero (a steward may lower a total under what is spent)."""
    return max(0.0, total.epsilon - used.epsilon), max(0.0, total.delta - used.delta)


def _fits(used: float, asked: float, total: float) -> bool:
    return used + asked <= total * (1 + REL_TOL)


def check_amounts(epsilon: object, delta: object) -> None:
    """Refuse amounts that are not a meaningful (epsilon, delta) request (they come from a caller's request)."""
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    if not (isinstance(delta, int | float) and math.isfinite(delta) and 0 <= delta < 1):
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}")


def check_reserve(where: str, total: Budget, used: Usage, epsilon: float, delta: float) -> None:
    """Raise :class:`BudgetExceeded` (with the numbers) unless ``(epsilon, delta)`` fits in what is left."""
    check_amounts(epsilon, delta)
    eps_ok = _fits(used.epsilon, epsilon, total.epsilon)
    delta_ok = _fits(used.delta, delta, total.delta)
    if eps_ok and delta_ok:
        return
    eps_left, delta_left = left(total, used)
    parts = []
    if not eps_ok:
        parts.append(
            f"epsilon {epsilon:g} asked, but {where} has {eps_left:g} left of {total.epsilon:g} "
            f"({used.spent_epsilon:g} spent, {used.reserved_epsilon:g} reserved by running trainings)"
        )
    if not delta_ok:
        parts.append(
            f"delta {delta:g} asked, but {where} has {delta_left:g} left of {total.delta:g} "
            f"({used.spent_delta:g} spent, {used.reserved_delta:g} reserved)"
        )
    raise BudgetExceeded(
        "privacy budget exceeded: " + "; ".join(parts) + ". Ask for less (a smaller target_epsilon, "
        "or target_delta), wait for running trainings to finish, or ask a data steward for more budget."
    )


def member_left(share: float, total: Budget, member_used: Usage) -> float:
    """The epsilon of a dataset still open to one member within her ``share`` of its total (a project's
    ``member_share``), having spent and reserved ``member_used``; what is left of the dataset may be less."""
    return max(0.0, float(total.epsilon) * share - member_used.epsilon)


def check_member_share(
    where: str, member: str, share: float, total: Budget, member_used: Usage, epsilon: float, delta: float = 0.0
) -> None:
    """Raise :class:`BudgetExceeded` unless ``member``'s spent and reserved epsilon of the dataset, with
    ``epsilon`` more, and their delta, with ``delta`` more, stay within ``share`` of its totals (a project's
    ``member_share``; 1: no bound). Delta is shared as epsilon is: a member holding a dataset's whole delta
    with a tiny epsilon left every other member nothing to reserve."""
    if share >= 1:
        return
    allowed = total.epsilon * share
    if not _fits(member_used.epsilon, epsilon, allowed):
        raise BudgetExceeded(
            f"privacy budget exceeded: epsilon {epsilon:g} asked, but {member} has used {member_used.epsilon:g} "
            f"({member_used.spent_epsilon:g} spent, {member_used.reserved_epsilon:g} reserved) of the "
            f"{allowed:g} one member of the project may use of {where}'s {total.epsilon:g} (member_share "
            f"{share:g}), so that every member keeps a part of it. Ask for at most "
            f"{member_left(share, total, member_used):g}, or ask a data steward."
        )
    allowed_delta = total.delta * share
    if not _fits(member_used.delta, delta, allowed_delta):
        raise BudgetExceeded(
            f"privacy budget exceeded: delta {delta:g} asked, but {member} has used {member_used.delta:g} "
            f"({member_used.spent_delta:g} spent, {member_used.reserved_delta:g} reserved) of the "
            f"{allowed_delta:g} one member of the project may use of {where}'s delta {total.delta:g} "
            f"(member_share {share:g}), so that every member keeps a part of it. Ask for at most "
            f"{max(0.0, allowed_delta - member_used.delta):g} (target_delta), or ask a data steward."
        )


def check_settle(reserved_epsilon: float, reserved_delta: float, epsilon_spent: object, delta_spent: object) -> None:
    """A run may not settle more than it reserved (it would spend budget nobody checked); the amounts spent
    come from the caller's request."""
    for name, spent, reserved in (("epsilon", epsilon_spent, reserved_epsilon), ("delta", delta_spent, reserved_delta)):
        if not (isinstance(spent, int | float) and math.isfinite(spent) and spent >= 0):
            raise ValueError(f"{name}_spent must be a number >= 0, got {spent!r}")
        if spent > reserved * (1 + REL_TOL):
            raise ValueError(
                f"{name}_spent {spent:g} is more than the {reserved:g} reserved; a run cannot spend more "
                "than it reserved. The reservation stays counted in full."
            )


def default_delta(total_delta: float, dataset_size: int) -> float:
    """The delta of one training run: a tenth of the dataset's total delta (room for ten runs), and below
    1/(10 n) for n rows (a delta near 1/n would allow leaking a whole row)."""
    return min(total_delta / 10, 1 / (10 * dataset_size))
