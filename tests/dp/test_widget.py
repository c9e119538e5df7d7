"""dp.budget(): widgets with the numbers the ledger holds for the caller, and a plot of spending."""

import ipywidgets as widgets

from paitient import dp
from paitient.kernel.ledger import LedgerClient


def test_budget_widget_shows_the_ledger(service, site, member):
    a = service.ledger.reserve("oncology", "breast_cancer", 4.0, 1e-6, user="alice", pid=1)
    service.ledger.settle(a, 3.0)
    service.ledger.reserve("oncology", "gbsg2", 0.5, 1e-7, user="alice", pid=1)
    service.ledger.reserve("cardio", "diabetes", 1.0, 1e-7, user="bob", pid=1)
    view = dp.budget(run_dir=site.run_dir)  # as root: every project (a user sees only theirs, test_service)
    assert isinstance(view, widgets.VBox) and len(view.children) == 2
    cardio, oncology = view.children
    assert "Privacy budget of cardio" in cardio.children[0].value
    table, bc, gbsg2, image = oncology.children
    assert "Privacy budget of oncology" in table.value
    assert "<td>breast_cancer</td><td>10</td><td>3</td><td>0</td><td><b>7</b></td>" in table.value
    assert (bc.description, bc.value, bc.max) == ("breast_cancer", 3.0, 10.0)
    assert (gbsg2.description, gbsg2.value, gbsg2.max) == ("gbsg2", 0.5, 2.0)
    assert image.format == "png" and image.value[:8] == b"\x89PNG\r\n\x1a\n" and len(image.value) > 5000
    only = dp.budget("oncology", client=LedgerClient(site.run_dir))
    assert len(only.children) == 1
