"""The airlock service: the only way for outputs to leave the workspace.

Process: ``paitient service airlock``, started by the hub as a managed service. User: root.
Trusted for: deciding releases. It keeps requests in its own store (:mod:`.store`), runs the automatic
checks (:mod:`.checks`), serves the stewards' review pages (:mod:`.web`) and records every decision in the
audit trail. Kernels reach it through :mod:`paitient.kernel.airlock`.
"""
