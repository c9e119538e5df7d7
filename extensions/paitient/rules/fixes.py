"""What to change in an output so that a check that did not pass would: one concrete fix per check. Pure.

The airlock's checks say what failed and why; a researcher also needs to know what to do about it before
filing a request. :func:`fix_for` gives that, from the check's name and its details (thresholds, the earlier
requests a difference was taken with). A fix never quotes a cell of the table: it says what to do with the
cells the check names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_SUPPRESS_OR_MERGE = (
    "suppress these cells (leave them empty), or merge the categories they fall in with their neighbours "
    "(or widen the bins) and recompute the table"
)

FIXES: dict[str, str] = {
    "minimum_count": "every count must reach {threshold}: " + _SUPPRESS_OR_MERGE,
    "dominance": "a few contributors make up most of these cells: " + _SUPPRESS_OR_MERGE + " so more people share each",
    "p_ratio": "these cells let the largest contributor be estimated: " + _SUPPRESS_OR_MERGE,
    "zeros": "round or suppress the zero cells, or merge categories so no group is empty; if a zero is structural "
    "(no one can have the attribute), say so in the justification",
    "missing": "fill or drop the missing cells, or say in the justification what they mean",
    "negative": "a count or magnitude below zero cannot be checked: recompute the table from non-negative values",
    "labels": "use the catalogued categories and column names of the project's datasets for text cells and "
    "headers (no free text); ask the stewards to add a label the catalogue lacks to the project's table_labels",
    "row_content": "aggregate: export counts or statistics by category, never patient rows (drop pseudonyms and "
    "row-level columns, then group)",
    "row_level": "aggregate: export counts or statistics by category, not the rows of a dataset",
    "published_copy": "published dataset files never leave; export an aggregate of them",
    "differencing": "align bins and populations with the earlier release{earlier}: use the same categories, bins "
    "and filter, or merge categories so that no difference counts fewer than {threshold}",
    "recipe": "submit exactly the table the recipe makes, or correct the recipe (dataset, index, columns, values, "
    "aggfunc, filter)",
    "readable": "save tables with df.to_csv(path) or df.to_parquet(path)",
    "canonical": "save the output in a form its kind takes: tables as CSV or Parquet, figures as PNG, weights as "
    "safetensors",
    "image": "save figures as PNG, e.g. plt.savefig('figure.png'), with nothing but the figure in the file",
    "format": "save weights with safetensors.torch.save_file(model.state_dict(), path)",
    "certified": "train with paitient.jobs.submit: the runner certifies the weights it trains",
    "policy": "train with paitient.jobs.submit: this project releases certified weights only",
    "training_record": "train with paitient.kernel.dp (or paitient.jobs.submit) so the privacy ledger records "
    "the run, within the project's budget",
    "membership_inference": "give the audit what it needs (model_source=, target=, split=), or train with more "
    "noise or fewer epochs so the model remembers its training rows less",
    "manual_review": "nothing to change: a steward reviews this kind of output by hand",
    "internal": "nothing to change in the output: tell the workspace operator",
}
"""Each check's fix, with ``{threshold}`` and ``{earlier}`` filled from its details."""


def fix_for(check: Mapping[str, Any], *, min_count: int = 10) -> str:
    """The fix for one check result (``{"check", "status", "reason", "details"}``); empty when it passed."""
    if check.get("status") == "pass":
        return ""
    name = str(check.get("check", ""))
    details = check.get("details") or {}
    template = FIXES.get(name, "see the reason; a steward judges it")
    threshold = details.get("threshold", min_count) if isinstance(details, Mapping) else min_count
    earlier = details.get("earlier") if isinstance(details, Mapping) else None
    named = ", ".join(str(e) for e in earlier) if isinstance(earlier, list) and earlier else ""
    return template.format(threshold=threshold, earlier=f" ({named})" if named else "")
