"""paitient.kernel.airlock: the only way out of the workspace.

In a kernel::

    from paitient import airlock
    rid = airlock.request("table.csv", kind="table", justification="Table 1 of the paper")
    airlock.status(rid)
    airlock.form()            # the same as a form

Root-side, :mod:`paitient.services.airlock.service` runs the checks and the review pages (see docs/airlock.md).
"""

from paitient.kernel.airlock.client import AirlockError, request, status
from paitient.kernel.airlock.widget import form
from paitient.rules.split import split_indices

__all__ = ["AirlockError", "form", "request", "split_indices", "status"]
