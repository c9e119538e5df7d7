"""paitient.airlock: the only way out of the workspace.

In a kernel::

    from paitient import airlock
    rid = airlock.request("table.csv", kind="table", justification="Table 1 of the paper")
    airlock.status(rid)
    airlock.form()            # the same as a form

Root-side, :mod:`paitient.airlock.service` runs the checks and the review pages (see docs/airlock.md).
"""

from paitient.airlock.client import AirlockError, request, status
from paitient.airlock.split import split_indices
from paitient.airlock.widget import form

__all__ = ["AirlockError", "form", "request", "split_indices", "status"]
