"""paitient.kernel.dp: differentially private training over Opacus, charged to the project's privacy ledger.

    from paitient import dp
    run = dp.make_private(model, optimizer, loader, target_epsilon=3.0, epochs=5, max_grad_norm=1.0,
                          project="oncology", dataset="breast_cancer", criterion=nn.CrossEntropyLoss())
    for epoch in range(run.epochs):
        for x, y in run.data_loader:
            run.optimizer.zero_grad()
            run.criterion(run.model(x), y).backward()
            run.optimizer.step()
    # the run settled itself after the last epoch: run.record is its training record
    dp.save_weights(run.model, "model.safetensors")   # its SHA-256 matches run.record
    dp.budget()                                        # what is left, per dataset

The keyword arguments of ``make_private`` from ``target_epsilon`` to ``progress`` are the fields of
:class:`RunOptions`; each is checked before anything is reserved (:class:`OptionsError`). See docs/privacy.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from paitient.kernel.dp.options import OptionsError, RunOptions
from paitient.kernel.dp.private import PrivateParts, PrivateRun, RunFinished, RunPlan
from paitient.kernel.dp.run import make_private
from paitient.kernel.dp.validate import DPModelError, problems
from paitient.kernel.dp.weights import file_sha256, save_weights, weights_sha256
from paitient.kernel.ledger import BudgetExceeded, LedgerClient, LedgerUnavailable

if TYPE_CHECKING:
    from ipywidgets import VBox


def budget(
    project: str | None = None, *, run_dir: str | os.PathLike[str] | None = None, client: LedgerClient | None = None
) -> VBox:
    """Widgets with your projects' budgets per dataset and a plot of spending over time.

    ``run_dir`` and ``client`` reach another ledger than ``$PAITIENT_RUN_DIR``'s (for tests)."""
    from paitient.kernel.dp.widget import budget as _budget

    return _budget(project, run_dir=run_dir, client=client)


__all__ = [
    "BudgetExceeded",
    "DPModelError",
    "LedgerUnavailable",
    "OptionsError",
    "PrivateParts",
    "PrivateRun",
    "RunFinished",
    "RunOptions",
    "RunPlan",
    "budget",
    "file_sha256",
    "make_private",
    "problems",
    "save_weights",
    "weights_sha256",
]
