"""paitient.kernel.airlock: the only way out of the workspace.

In a kernel::

    from paitient import airlock
    airlock.check("table.csv", kind="table")   # what the checks say, and how to fix it: nothing filed
    rid = airlock.request("table.csv", kind="table", justification="Table 1 of the paper")
    airlock.status(rid)
    airlock.form()            # the same as a form

A request can also be made as a value first, :class:`~paitient.kernel.airlock.spec.RequestSpec` (with a
:class:`~paitient.kernel.airlock.spec.TableRecipe` or a :class:`~paitient.kernel.airlock.spec.ModelSpec`),
checked when it is made, and sent with ``airlock.request(path, spec)``.

Root-side, :mod:`paitient.services.airlock.service` runs the checks and the review pages (see docs/airlock.md).
"""

from paitient.kernel.airlock.client import AirlockCheckFailed, AirlockError, check, request, status
from paitient.kernel.airlock.feedback import CheckResult
from paitient.kernel.airlock.spec import (
    HoldoutSplit,
    ModelSpec,
    RequestSpec,
    RequestSpecError,
    TableRecipe,
    TrainRows,
)
from paitient.kernel.airlock.widget import form
from paitient.rules.split import split_indices

__all__ = [
    "AirlockCheckFailed",
    "AirlockError",
    "CheckResult",
    "HoldoutSplit",
    "ModelSpec",
    "RequestSpec",
    "RequestSpecError",
    "TableRecipe",
    "TrainRows",
    "check",
    "form",
    "request",
    "split_indices",
    "status",
]
