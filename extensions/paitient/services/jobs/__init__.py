"""Certified training jobs: a root-side runner trains a researcher's model under DP and signs what it did.

So far: the runner's signing key (:mod:`.keys`) and the offline check of a signed record and its weights
(``paitient jobs verify``); the record itself is :mod:`paitient.rules.training_record`.
"""
