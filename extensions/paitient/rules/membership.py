"""The statistics of membership-inference attacks: how well a score tells training rows from held-out rows.

Both audits use these: the airlock's (a loss-threshold attack on a model released from a notebook, run in
its sandbox, which copies this file next to its worker) and the jobs runner's (on the model it trained).
So this module imports numpy and nothing else: no paitient, no torch.

- :func:`roc_auc_advantage`: the AUC of "a higher score means a member" (ties count half) and the
  attack's advantage, the largest TPR - FPR over thresholds;
- :func:`class_offsets`: a per-row reference for calibrating a loss: the median held-out loss of the row's
  class (for a regression, of its target's quintile among the held-out rows), so that rows which are
  hard or easy for any model stop counting as evidence;
- :func:`bootstrap_gap`: ``|AUC - 0.5|`` with a seeded percentile-bootstrap interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def roc_auc_advantage(member_scores: Any, nonmember_scores: Any) -> tuple[float, float]:
    """AUC (ties count half) and max TPR-FPR of "higher score means member"."""
    m = np.asarray(member_scores, dtype=float).ravel()
    n = np.asarray(nonmember_scores, dtype=float).ravel()
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # the average rank (1-based) of each distinct value: the ranks it spans, first to last, halved
    last = np.cumsum(counts)
    ranks = (last - (counts - 1) / 2.0)[inverse]
    auc = (ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n))
    # TPR - FPR at each threshold "score >= v", v a distinct value: members and others at or above v
    members_at = np.bincount(inverse, weights=is_member, minlength=len(values))
    tpr = np.cumsum(members_at[::-1]) / len(m)
    fpr = np.cumsum((counts - members_at)[::-1]) / len(n)
    advantage = float(max(0.0, float(np.max(tpr - fpr))))
    return float(auc), advantage


def class_offsets(
    reference_losses: Any, reference_targets: Any, targets: Any, *, classes: bool = True, bins: int = 5
) -> np.ndarray:
    """The calibration reference of each row of ``targets``: the median of ``reference_losses`` over the
    reference rows of the same class (``classes=True``), or of the same quantile bin of the target
    (``classes=False``: ``bins`` bins cut at the reference targets' quantiles). A class or bin without
    reference rows gets the median of all."""
    ref_loss = np.asarray(reference_losses, dtype=float).ravel()
    ref_t = np.asarray(reference_targets).ravel()
    t = np.asarray(targets).ravel()
    overall = float(np.median(ref_loss)) if len(ref_loss) else 0.0
    if classes:
        ref_key, key = ref_t, t
    else:
        edges = np.unique(np.quantile(ref_t.astype(float), np.linspace(0, 1, bins + 1)[1:-1]))
        ref_key, key = np.searchsorted(edges, ref_t.astype(float)), np.searchsorted(edges, t.astype(float))
    medians = {k: float(np.median(ref_loss[ref_key == k])) for k in np.unique(ref_key)}
    return np.array([medians.get(k, overall) for k in key.tolist()], dtype=float)


def bootstrap_gap(
    member_scores: Any, nonmember_scores: Any, *, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float, float]:
    """``|AUC - 0.5|`` of the scores, and the ``level`` percentile-bootstrap interval of it (members and
    non-members resampled separately, ``resamples`` times, from a generator seeded with ``seed``)."""
    m = np.asarray(member_scores, dtype=float).ravel()
    n = np.asarray(nonmember_scores, dtype=float).ravel()
    rng = np.random.default_rng(int(seed))
    gap = abs(roc_auc_advantage(m, n)[0] - 0.5)
    boots = np.array(
        [
            abs(roc_auc_advantage(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))])[0] - 0.5)
            for _ in range(resamples)
        ]
    )
    tail = (1 - level) / 2 * 100
    return float(gap), float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))


def two_digits(value: float) -> float:
    """``|AUC - 0.5|``-like ``value`` to 2 significant digits, inside [0, 0.5] (a number, never NaN: a value
    that is not finite counts as the worst, 0.5)."""
    if not np.isfinite(value):
        return 0.5
    return min(0.5, max(0.0, float(f"{float(value):.2g}")))


def attack_numbers(
    member_losses: Any,
    holdout_losses: Any,
    member_keys: Any,
    holdout_keys: Any,
    *,
    classes: bool,
    seed: int,
    resamples: int = 200,
) -> dict[str, float]:
    """Two attacks' ``|AUC - 0.5|`` with bootstrap intervals, from each row's loss (2 significant digits):

    - ``mia_loss``: a row is a member when its loss is low;
    - ``mia_calibrated``: the same on each row's loss minus the median held-out loss of its class (or, with
      ``classes=False``, of its target's quintile), so rows easy or hard for any model stop counting.

    Each has ``_low`` and ``_high`` (a 95% percentile bootstrap, ``resamples`` times, seeded). Both sides
    count: an AUC far below 0.5 gives a large number as well as one far above.
    """
    m_loss = np.asarray(member_losses, dtype=float).ravel()
    h_loss = np.asarray(holdout_losses, dtype=float).ravel()
    m_ref = class_offsets(h_loss, holdout_keys, member_keys, classes=classes)
    h_ref = class_offsets(h_loss, holdout_keys, holdout_keys, classes=classes)
    attacks = {"mia_loss": (-m_loss, -h_loss), "mia_calibrated": (m_ref - m_loss, h_ref - h_loss)}
    out: dict[str, float] = {}
    for i, (name, (member_scores, holdout_scores)) in enumerate(attacks.items()):
        gap, low, high = bootstrap_gap(member_scores, holdout_scores, resamples=resamples, seed=int(seed) * 2 + i)
        out[name], out[f"{name}_low"], out[f"{name}_high"] = (two_digits(v) for v in (gap, low, high))
    return out
