"""Why an ingest was refused. Every refusal names the row, column or key and what to do about it."""

from __future__ import annotations

from paitient.rules.pseudonyms import ColumnError

__all__ = ["ColumnError", "IngestRefused"]


class IngestRefused(Exception):
    """Nothing was published. ``problems`` lists each reason on its own line."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return f"ingest refused, nothing published: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"ingest refused, nothing published ({len(self.problems)} problems):\n{lines}"
