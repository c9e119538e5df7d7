"""paitient: a secure analysis workspace for clinical AI research.

Researchers' code comes to the data: sandboxed JupyterLab kernels on pseudonymised data, differentially
private training with a per-project privacy budget, and an airlock as the only way out.

In a kernel, the researcher-facing modules are ``paitient.data``, ``paitient.dp`` and ``paitient.airlock``.
"""

__version__ = "0.1.0"
