"""The privacy-budget ledger service: reservations and settlements of epsilon per project and dataset.

Process: ``paitient service ledger``, started by the hub as a managed service. User: root.
Trusted for: the budget. Its store (:mod:`.store`) is its own; other services ask it through its socket
(:mod:`.service`), kernels through :mod:`paitient.kernel.ledger`.
"""
