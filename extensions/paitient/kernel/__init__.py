"""Zone ``paitient.kernel``: everything imported inside the sandboxed kernel.

Process: the researcher's IPython kernel, in bubblewrap (no network, own projects' datasets read-only,
home writable). User: the researcher's own system account.
Trusted for: nothing. The researcher's code runs in the same process and can change any of it, so
nothing this zone computes or reports decides a release: DP records it sends are self-reported, checks it
runs are advice. What counts is decided root-side (``paitient.services``).

Researchers import it by the short names ``from paitient import data, dp, airlock``:

- :mod:`~paitient.kernel.data`: the catalogue and ``load()`` of the user's datasets;
- :mod:`~paitient.kernel.dp`: DP training wrappers over Opacus, charged to the project's ledger;
- :mod:`~paitient.kernel.airlock`: requests to the airlock, its form widget;
- :mod:`~paitient.kernel.ledger`: the client of the privacy ledger's socket.
"""
