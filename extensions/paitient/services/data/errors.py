"""Why an ingest was refused. Every refusal names the row, column or key and what to do about it."""

from __future__ import annotations

from paitient.rules.pseudonyms import ColumnError

__all__ = ["ColumnError", "IngestRefused"]


class IngestRefused(Exception):
    """Nothing was published. ``problems`` lists each reason on its own line, for the operator; ``recorded``
    the same reasons as the audit trail keeps them, where a reason names source values (the smallest group
    of a k-anonymity refusal: values of fewer than ``min_k`` patients, which stewards would read in the
    trail's page, and which no record can take back)."""

    def __init__(self, problems: list[str] | str, recorded: list[str] | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.recorded = list(recorded) if recorded is not None else self.problems
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return f"ingest refused, nothing published: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"ingest refused, nothing published ({len(self.problems)} problems):\n{lines}"
