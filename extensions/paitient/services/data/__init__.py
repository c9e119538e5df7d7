"""The data service: pseudonymising ingest and publication of datasets.

Process: ``paitient ingest`` and ``paitient datasets``, run by the operator. User: root.
Trusted for: what becomes a dataset. It reads source tables, drops and pseudonymises identifiers with the
per-project keys (:mod:`.keys`, root-only), and publishes read-only versions under the data root.
"""
