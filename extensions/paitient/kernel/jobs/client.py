"""The researcher's side of certified training jobs: submit a model, follow it, read what the runner signed.

``submit(model, dataset=..., target=..., ...)`` exports the model as a graph (no parameter values, no
code), sends it with the request to the runner's socket and returns a :class:`Job`. ``job.wait()`` follows
it with a progress bar (queued, running: step, epsilon spent, loss; then done, or failed with the reason),
``job.record`` is the signed training record, ``job.metrics`` what the runner measured on its held-out rows.
Nothing reported here decides anything: the runner computed and signed it, and the airlock checks the
signature.
"""

from __future__ import annotations

import os
import time
from typing import Any

from paitient.channel import TIMEOUT, UNAVAILABLE, ChannelError, ServiceClient

__all__ = [
    "ChannelError",
    "Job",
    "JobFailed",
    "JobsClient",
    "JobsUnavailable",
    "cancel",
    "checkpoints",
    "list_jobs",
    "submit",
]

FINAL = ("done", "failed", "cancelled")


class JobsUnavailable(ChannelError):
    """No runner to talk to (not inside the workspace, or the service is down)."""


class JobFailed(RuntimeError):
    """The job ended without a model; the message is the runner's reason."""


class JobsClient(ServiceClient):
    service = "jobs"
    errors = {UNAVAILABLE: JobsUnavailable, TIMEOUT: JobsUnavailable}
    outside_hint = "Submit jobs from a paitient kernel (the workspace sets it)"

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, timeout: float = 120.0):
        super().__init__(run_dir, timeout=timeout)

    def submit(self, program: bytes, request: dict[str, Any]) -> dict[str, Any]:
        fd = os.memfd_create("paitient-graph", 0)
        try:
            os.write(fd, program)
            answer: dict[str, Any] = self.call("submit", request, fds=[fd])
        finally:
            os.close(fd)
        return answer

    def checkpoints(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.call("checkpoints", {})
        return answer

    def status(self, job_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("status", {"job_id": job_id})
        return answer

    def list(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.call("list", {})
        return answer

    def cancel(self, job_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("cancel", {"job_id": job_id})
        return answer

    def record(self, job_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("record", {"job_id": job_id})
        return answer


class Job:
    """One submitted job, as the runner reports it (refreshed from the runner on every look)."""

    def __init__(self, info: dict[str, Any], client: JobsClient | None = None):
        self._info = info
        self._client = client or JobsClient()
        self._record: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return str(self._info["id"])

    def refresh(self) -> dict[str, Any]:
        self._info = self._client.status(self.id)
        return self._info

    @property
    def state(self) -> str:
        return str(self.refresh()["state"])

    @property
    def progress(self) -> dict[str, Any]:
        return dict(self.refresh().get("progress") or {})

    @property
    def reason(self) -> str:
        return str(self.refresh().get("reason") or "")

    @property
    def record(self) -> dict[str, Any]:
        """The signed training record (``{"format", "key_id", "record", "signature"}``) of a finished job."""
        if self._record is None:
            if self.state != "done":
                raise JobFailed(f"job {self.id} is {self._info['state']}: it has no record" + _why(self._info))
            self._record = self._client.record(self.id)
        return self._record

    @property
    def metrics(self) -> dict[str, float]:
        """Test metrics and the membership-inference audit, as the runner measured them on held-out rows."""
        return dict(self.record["record"]["metrics"])

    def cancel(self) -> dict[str, Any]:
        self._info = self._client.cancel(self.id)
        return self._info

    def wait(self, timeout: float | None = None, *, poll: float = 1.0, widget: bool = True) -> Job:
        """Wait until the job ends, showing its progress; raises :class:`JobFailed` unless it is done."""
        bar = _ProgressView(self.id) if widget else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.refresh()
            if bar is not None:
                bar.show(info)
            if info["state"] in FINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {info['state']} after {timeout:g} s; wait() again")
            time.sleep(poll)
        if info["state"] != "done":
            raise JobFailed(f"job {self.id} {info['state']}" + _why(info))
        return self

    def __repr__(self) -> str:
        return f"<Job {self.id} {self._info.get('state')} {self._info.get('project')}/{self._info.get('dataset')}>"


def _why(info: dict[str, Any]) -> str:
    return f": {info['reason']}" if info.get("reason") else ""


class _ProgressView:
    """A progress bar and a status line (ipywidgets in a notebook; nothing elsewhere)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        try:
            import ipywidgets as w
            from IPython.display import display
        except ImportError:  # outside IPython: no display
            self.bar = None
            return
        self.bar = w.IntProgress(min=0, max=1, description="queued", layout=w.Layout(width="60%"))
        self.line = w.HTML()
        display(w.VBox([self.bar, self.line]))

    def show(self, info: dict[str, Any]) -> None:
        if self.bar is None:
            return
        p = info.get("progress") or {}
        self.bar.max = max(1, int(p.get("steps") or 1))
        self.bar.value = int(p.get("step") or (self.bar.max if info["state"] == "done" else 0))
        self.bar.description = str(info["state"])
        self.bar.bar_style = {"done": "success", "failed": "danger", "cancelled": "warning"}.get(info["state"], "")
        parts = [f"job {self.job_id}"]
        if "epsilon" in p:
            parts.append(f"epsilon spent {p['epsilon']}")
        if "loss" in p:
            parts.append(f"loss {p['loss']}")
        if info.get("reason"):
            parts.append(str(info["reason"]))
        from html import escape

        self.line.value = escape(" · ".join(parts))


def submit(
    model: Any,
    *,
    dataset: str,
    target: str,
    epochs: int,
    batch_size: int,
    max_grad_norm: float,
    target_epsilon: float,
    loss: str = "cross_entropy",
    features: list[str] | None = None,
    preprocessing: list[dict[str, Any]] | None = None,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    init: str = "default",
    project: str | None = None,
    holdout: float = 0.2,
    n_features: int | None = None,
    checkpoint: str | None = None,
) -> Job:
    """Send ``model`` to the runner to be trained under DP on ``dataset``; returns the queued :class:`Job`.

    The model goes as its exported graph only: the runner initialises every parameter itself, so values
    set in the notebook never reach training. ``n_features``: the width of one input row (default: the
    model's first layer's ``in_features``). ``checkpoint``: the name of a pretrained checkpoint of the
    operator's registry (:func:`checkpoints` lists them) to start from instead; its parameter names and
    shapes must be exactly the model's, and the runner reads its values from the registry itself.
    ``loss``: ``cross_entropy`` (one output per class), ``bce_with_logits`` or ``smooth_hinge`` (one output,
    two classes) or ``mse``. ``momentum``: ``sgd``'s heavy-ball momentum (two significant digits, below 1).
    ``init``: how the runner starts the parameters without a checkpoint, ``default`` (PyTorch's own
    initialisation of each layer kind, from a seed it draws) or ``zeros``.
    """
    import torch

    from paitient.kernel.jobs.export import export_graph

    width = n_features or _input_width(model)
    program = export_graph(model, torch.zeros(2, width))
    request: dict[str, Any] = {
        "dataset": dataset,
        "target": target,
        "epochs": epochs,
        "batch_size": batch_size,
        "max_grad_norm": max_grad_norm,
        "target_epsilon": target_epsilon,
        "loss": loss,
        "lr": lr,
        "optimizer": optimizer,
        "holdout": holdout,
        "preprocessing": preprocessing or [],
    }
    if momentum:
        request["momentum"] = momentum
    if init != "default":
        request["init"] = init
    if features is not None:
        request["features"] = features
    if project is not None:
        request["project"] = project
    if checkpoint is not None:
        request["checkpoint"] = checkpoint
    client = JobsClient()
    return Job(client.submit(program, request), client)


def _input_width(model: Any) -> int:
    for module in model.modules():
        width = getattr(module, "in_features", None)
        if isinstance(width, int):
            return width
    raise ValueError("cannot tell the width of one input row from the model; pass n_features=...")


def checkpoints() -> list[dict[str, Any]]:
    """The pretrained checkpoints a job may start from (``submit(..., checkpoint=name)``): each one's name,
    SHA-256, description, source and licence, and parameter names and shapes, as the operator added them."""
    return JobsClient().checkpoints()


def list_jobs() -> list[Job]:
    client = JobsClient()
    return [Job(info, client) for info in client.list()]


def cancel(job: Job | str) -> dict[str, Any]:
    client = JobsClient()
    return client.cancel(job.id if isinstance(job, Job) else job)
