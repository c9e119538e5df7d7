"""The researcher's side of the airlock, inside a kernel: submit an output, see what became of it.

The kernel has no network. It opens the file itself and hands the open descriptor to the airlock service
over the unix socket ``$PAITIENT_RUN_DIR/airlock.sock``; the service knows the caller from the socket's
peer credentials and takes a copy out of the user's reach.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Unpack, overload

from paitient.channel import ChannelError, ServiceClient
from paitient.kernel.airlock.spec import (
    KINDS,
    Kind,
    RequestOptions,
    RequestSpec,
    RequestSpecError,
    request_spec,
)


class AirlockError(ChannelError, RuntimeError):
    """The airlock refused or could not take a request; the message says what to do, ``code`` says which."""


class AirlockClient(ServiceClient):
    """The kernel's calls to the airlock over ``$PAITIENT_RUN_DIR/airlock.sock``."""

    service = "airlock"
    default_timeout = 300.0
    error_class = AirlockError
    outside_hint = "paitient.kernel.airlock works inside a paitient kernel (the workspace sets it)"

    def submit(self, args: dict[str, Any], fd: int) -> dict[str, Any]:
        """Hand the open file ``fd`` over with the request's arguments; the answer holds its ``id``."""
        answer: dict[str, Any] = self.call("request", args, fds=[fd])
        return answer

    def submit_job(self, job_id: str, justification: str, project: str | None = None) -> dict[str, Any]:
        """Request the release of a training job's weights; the airlock takes them from the runner."""
        args = {"job_id": job_id, "justification": justification}
        if project is not None:
            args["project"] = project
        answer: dict[str, Any] = self.call("request_job", args)
        return answer

    def status(self, request_id: str) -> dict[str, Any]:
        """One of the caller's requests, with its checks and decisions."""
        one: dict[str, Any] = self.call("status", {"id": request_id})
        return one

    def requests(self) -> list[dict[str, Any]]:
        """The caller's own requests, newest first."""
        many: list[dict[str, Any]] = self.call("list", {})
        return many


@overload
def request(path: str | os.PathLike[str], spec: RequestSpec) -> str: ...


@overload
def request(
    path: str | os.PathLike[str], *, kind: Kind, justification: str, **options: Unpack[RequestOptions]
) -> str: ...


def request(path: Any, spec: RequestSpec | None = None, **keywords: Any) -> str:
    """Ask the airlock to release the file at ``path`` (or a training job's weights); return the request id.

    A :class:`paitient.kernel.jobs.Job` that is done: ``request(job, justification="...")``; the airlock takes
    its weights and signed record from the runner, nothing from this kernel.

    Give a :class:`~paitient.kernel.airlock.spec.RequestSpec`, or its parts as keyword arguments:
    ``kind``: ``table`` (CSV or Parquet; give ``recipe=`` — dataset, index, columns, values, aggfunc — so
    the dominance and p-ratio rules can be checked), ``figure``, ``weights`` (safetensors from
    ``paitient.kernel.dp`` training) or ``other``. For weights, the membership-inference audit needs the model:
    ``model_source`` (the class itself, or its Python source), ``model_kwargs``, ``target`` (and
    ``features``, default all other columns), ``loss`` (cross_entropy, bce, mse), ``preprocess``
    (``none`` or ``standardize`` with the training rows' mean and std) and the train/holdout ``split``
    (``{"holdout": 0.3, "seed": 0}`` as made by :func:`paitient.kernel.airlock.split_indices`, or
    ``{"train_rows": [...]}``). Values the airlock would refuse raise :class:`AirlockError` before the
    file is opened.

    The airlock keeps, checks, shows and releases its own re-encoding of the file, never the file itself: a
    table re-written from its parsed cells as CSV (``format="xlsx"`` for an Excel sheet), a figure's pixels as
    a PNG, text as normalised UTF-8, weights without metadata. A file that does not parse as its ``kind`` is
    refused with the reason.
    """
    from paitient.kernel.jobs.client import Job

    if isinstance(path, Job):
        justification = keywords.pop("justification", None)
        project = keywords.pop("project", None)
        if keywords or spec is not None:
            raise AirlockError("a job's weights take justification= (and project=) only")
        if not isinstance(justification, str) or not justification.strip():
            raise AirlockError("say why these weights should leave the workspace: justification='...'")
        return str(AirlockClient().submit_job(path.id, justification, project)["id"])
    if spec is not None:
        if not isinstance(spec, RequestSpec):
            raise AirlockError(f"the second argument must be a RequestSpec, got {type(spec).__name__}")
        if keywords:
            raise AirlockError("give a RequestSpec or the request's keyword arguments, not both")
    else:
        if keywords.get("kind") is None:
            raise AirlockError(f"say what the file is: kind= one of {', '.join(KINDS)}")
        if keywords.get("justification") is None:
            raise AirlockError("say why this output should leave the workspace: justification='...'")
        try:
            spec = request_spec(**keywords)
        except RequestSpecError as e:
            raise AirlockError(str(e)) from None
    args = spec.to_wire(Path(path).name)
    try:
        f = open(path, "rb")  # noqa: SIM115 - the descriptor travels to the service
    except OSError as e:
        raise AirlockError(f"cannot open {path}: {e.strerror}") from None
    with f:
        result = AirlockClient().submit(args, f.fileno())
    return str(result["id"])


class Requests(list[dict[str, Any]]):
    """The caller's requests; shows as a table in a notebook."""

    def _repr_html_(self) -> str:
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(r.get(k, '')))}</td>"
                for k in ("id", "project", "kind", "filename", "state", "overall")
            )
            + "<td>"
            + "<br>".join(html.escape(f"{c['check']}: {c['status']} — {c['reason']}") for c in r.get("checks", []))
            + "</td></tr>"
            for r in self
        )
        head = "".join(f"<th>{h}</th>" for h in ("request", "project", "kind", "file", "state", "checks", "reasons"))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def status(request_id: str | None = None) -> Requests | dict[str, Any]:
    """One of your requests (with its checks, decisions and reasons), or all of them, newest first."""
    if request_id:
        return AirlockClient().status(request_id)
    return Requests(AirlockClient().requests())
