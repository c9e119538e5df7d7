"""Certified training jobs, the researcher's side: ``from paitient import jobs``.

``jobs.submit(model, dataset=..., target=..., epochs=..., batch_size=..., max_grad_norm=...,
target_epsilon=...)`` sends the model's graph to the runner, which trains it under DP on the dataset with
parameters it owns and signs the record; ``job.wait()``, ``job.record``, ``job.metrics``;
``jobs.list()``, ``jobs.cancel(job)``. ``jobs.checkpoints()`` lists the pretrained checkpoints of the
operator's registry; ``submit(..., checkpoint=name)`` starts from one. Weights from a job are released with
``airlock.request(job, justification=...)``.
"""

from paitient.kernel.jobs.client import (
    ChannelError,
    Job,
    JobFailed,
    JobsClient,
    JobsUnavailable,
    cancel,
    checkpoints,
    submit,
)
from paitient.kernel.jobs.client import list_jobs as list  # noqa: A001 - the researcher's name for it
from paitient.kernel.jobs.export import ModelNotExportable, export_graph

__all__ = [
    "ChannelError",
    "Job",
    "JobFailed",
    "JobsClient",
    "JobsUnavailable",
    "ModelNotExportable",
    "cancel",
    "checkpoints",
    "export_graph",
    "list",
    "submit",
]
