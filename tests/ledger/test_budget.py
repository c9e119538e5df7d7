"""Budget arithmetic alone: basic composition, what each state counts for, refusals with the numbers."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paitient.config import Budget
from paitient.rules.budget import BudgetExceeded, Entry, Usage, check_reserve, check_settle, left, usage


def test_states_count_as_documented():
    u = usage(
        [
            Entry("reserved", 1.0, 1e-6),
            Entry("settled", 2.0, 1e-6, epsilon_spent=0.5, delta_spent=1e-6),
            Entry("lost", 3.0, 2e-6),
        ]
    )
    assert u == Usage(spent_epsilon=3.5, spent_delta=3e-6, reserved_epsilon=1.0, reserved_delta=1e-6)
    assert u.epsilon == 4.5
    assert left(Budget(10.0, 1e-5), u) == pytest.approx((5.5, 6e-6))


def test_refusal_names_the_numbers():
    used = Usage(spent_epsilon=6.0, reserved_epsilon=3.0)
    with pytest.raises(BudgetExceeded) as e:
        check_reserve("oncology/breast_cancer", Budget(10.0, 1e-5), used, 2.0, 1e-6)
    msg = str(e.value)
    assert "epsilon 2 asked" in msg and "has 1 left of 10" in msg and "6 spent, 3 reserved" in msg
    assert "delta" not in msg.split("asked")[0]


def test_delta_is_checked_too():
    with pytest.raises(BudgetExceeded, match="delta 6e-06 asked, but d has 5e-06 left"):
        check_reserve("d", Budget(10.0, 1e-5), Usage(spent_delta=5e-6), 1.0, 6e-6)


def test_whole_budget_can_be_used_in_tenths():
    u = usage([Entry("settled", 0.1, 1e-6, 0.1, 1e-6)] * 9)
    check_reserve("d", Budget(1.0, 1e-5), u, 0.1, 1e-6)  # 10 x 0.1 == 1.0 despite rounding


def test_settle_cannot_exceed_reservation():
    check_settle(1.0, 1e-6, 0.99, 1e-6)
    with pytest.raises(ValueError, match="epsilon_spent 1.5 is more than the 1 reserved"):
        check_settle(1.0, 1e-6, 1.5, 1e-6)
    with pytest.raises(ValueError, match="must be a number >= 0"):
        check_settle(1.0, 1e-6, float("nan"), 1e-6)


@given(
    st.lists(st.tuples(st.sampled_from(["reserved", "settled", "lost"]), st.floats(0.01, 5), st.floats(0, 1))),
    st.floats(0.01, 5),
)
def test_accepting_a_reservation_never_takes_usage_over_total(entries, asked):
    total = Budget(10.0, 1e-5)
    es = [Entry(s, eps, 1e-7, eps * frac, 1e-7) for s, eps, frac in entries]
    used = usage(es)
    try:
        check_reserve("d", total, used, asked, 1e-7)
    except BudgetExceeded:
        assert used.epsilon + asked > total.epsilon or used.delta + 1e-7 > total.delta
    else:
        after = usage([*es, Entry("reserved", asked, 1e-7)])
        assert after.epsilon <= total.epsilon * (1 + 1e-9) and after.delta <= total.delta * (1 + 1e-9)
