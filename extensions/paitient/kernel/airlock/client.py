"""The researcher's side of the airlock, inside a kernel: submit an output, see what became of it.

The kernel has no network. It opens the file itself and hands the open descriptor to the airlock service
over the unix socket ``$PAITIENT_RUN_DIR/airlock.sock``; the service knows the caller from the socket's
peer credentials and takes a copy out of the user's reach.
"""

from __future__ import annotations

import html
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Unpack, overload

from paitient.channel import TIMEOUT, TOO_LARGE, UNKNOWN_OP, ChannelError, ServiceClient
from paitient.kernel.airlock.feedback import CheckResult, read_own_table
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


class AirlockCheckFailed(AirlockError):
    """Not filed: the airlock's checks would fail and the request was not confirmed; ``result`` says why."""

    def __init__(self, message: str, result: CheckResult):
        super().__init__(message, "check_failed")
        self.result = result


BUSY = "busy"
"""The service's code for a check refused while the caller's previous one (or too many others) runs."""
REFUSED_AT_REQUEST = ("canonical", "policy")
"""Failed checks that mirror a refusal of the request itself (a file that does not parse as its kind, weights
the project does not release): ``request`` files nothing then either, and the service's refusal says why."""
UNCHECKED = (BUSY, TIMEOUT, TOO_LARGE, UNKNOWN_OP)
"""Refusals of a check that say nothing about the output: ``request`` files it anyway (its checks run after)."""
OWN_TABLE_BYTES = 16 << 20
"""Largest table the kernel reads back to mark its failed cells."""


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

    def check(self, args: dict[str, Any], fd: int) -> dict[str, Any]:
        """Run the checks a request of the open file ``fd`` would get, without filing it."""
        answer: dict[str, Any] = self.call("check", args, fds=[fd])
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
def request(
    path: str | os.PathLike[str] | Any,
    spec: RequestSpec,
    *,
    confirm: bool | None = None,
    name: str | None = None,
) -> str: ...


@overload
def request(
    path: str | os.PathLike[str] | Any,
    *,
    kind: Kind,
    justification: str,
    confirm: bool | None = None,
    name: str | None = None,
    **options: Unpack[RequestOptions],
) -> str: ...


def request(
    path: Any, spec: RequestSpec | None = None, *, confirm: bool | None = None, name: str | None = None, **keywords: Any
) -> str:
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

    ``path`` may also be a pandas DataFrame (a table): the kernel writes it to an unnamed temporary file as CSV
    (its index too, unless it is the default one), named ``name=`` (default ``table.csv``).

    Before filing, the airlock runs the request's checks on the file (:func:`check`). When a check would fail,
    nothing is filed unless you confirm: ``confirm=True`` files it anyway (a steward can approve a failed check
    only with a written override), ``confirm=False`` never does. Without ``confirm=``, a notebook that can
    prompt (its front end allows ``input()``) shows the checks and asks; any other caller (a script, a
    notebook run by a tool) is not asked: it gets :class:`AirlockCheckFailed` saying why, with the checks on
    its ``result``, and nothing waits for an answer.
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
    if confirm is not None and not isinstance(confirm, bool):
        raise AirlockError(f"confirm= is True (file even if a check fails) or False, got {confirm!r}")
    client = AirlockClient()
    with _output(path, name) as (f, filename):
        args = spec.to_wire(filename)
        try:
            checked: CheckResult | None = _checked(client, args, f, spec.kind)
        except AirlockError as e:
            if e.code not in UNCHECKED:
                raise
            print(f"airlock: the check before filing did not run ({e}); filing: its checks run after", file=sys.stderr)
            checked = None
        refused_anyway = checked is not None and any(c in REFUSED_AT_REQUEST for c in checked.failed)
        if checked is not None and checked.would_fail and not refused_anyway and not _confirmed(checked, confirm):
            raise AirlockCheckFailed(
                f"not filed: the airlock's checks of {filename} would fail ({', '.join(checked.failed)}); fix the "
                "output as the checks say (airlock.check(...) shows each fix and the failed cells), or file it "
                "anyway for a steward to judge with airlock.request(..., confirm=True)",
                checked,
            )
        result = client.submit(args, f.fileno())
    return str(result["id"])


def check(
    path: Any,
    spec: RequestSpec | None = None,
    *,
    kind: Kind = "table",
    name: str | None = None,
    **options: Unpack[RequestOptions],
) -> CheckResult:
    """Run the checks a request of this output would get, without filing one; return what they say.

    ``path``: a file, or a pandas DataFrame (written to an unnamed temporary file as CSV, named ``name=``).
    ``kind`` and the other arguments are a request's (``project=``, ``recipe=``, ``format=``, the model of
    weights; no justification needed), or give a :class:`RequestSpec`. The airlock re-encodes the output and
    runs the same checks it runs on a request, and keeps nothing: no request, no stored file, no count table.
    The membership-inference audit of weights is not run (it runs when the request is filed); the result says
    so. The result shows, in a notebook, one row per check (status, why, fix) and the table's failed cells
    marked; in Python: ``.overall``, ``.would_fail``, ``.failed``, ``.cells``, ``.checks``, ``.fix(name)``.
    """
    if spec is not None:
        if not isinstance(spec, RequestSpec):
            raise AirlockError(f"the second argument must be a RequestSpec, got {type(spec).__name__}")
        if options:
            raise AirlockError("give a RequestSpec or the check's keyword arguments, not both")
    else:
        try:
            spec = request_spec(kind=kind, justification="(a check before a request)", **options)
        except RequestSpecError as e:
            raise AirlockError(str(e)) from None
    with _output(path, name) as (f, filename):
        return _checked(AirlockClient(), spec.to_wire(filename), f, spec.kind)


def _checked(client: AirlockClient, args: dict[str, Any], f: IO[bytes], kind: str) -> CheckResult:
    wire = {k: v for k, v in args.items() if k not in ("justification", "supersedes")}
    answer = client.check(wire, f.fileno())
    table = None
    if kind == "table" and os.fstat(f.fileno()).st_size <= OWN_TABLE_BYTES:
        table = read_own_table(os.pread(f.fileno(), OWN_TABLE_BYTES + 1, 0), str(args.get("filename", "")))
    return CheckResult(answer, table)


def _confirmed(checked: CheckResult, confirm: bool | None) -> bool:
    """Has the caller confirmed filing an output whose checks would fail? Asks only a notebook that can answer."""
    if confirm is not None:
        return confirm
    shell = _shell()
    if shell is None:
        return False
    from IPython.display import display

    display(checked)
    if not bool(getattr(getattr(shell, "kernel", None), "_allow_stdin", False)):
        return False  # a notebook run by a tool: nobody can answer, so nothing waits
    answer = input("The checks above would fail. File the request anyway, for a steward to judge? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


@contextmanager
def _output(obj: Any, name: str | None) -> Iterator[tuple[IO[bytes], str]]:
    """The output opened for reading, with its file name: a path opened here, or a DataFrame written as CSV to an
    unnamed temporary file (gone when closed)."""
    if hasattr(obj, "to_csv") and hasattr(obj, "columns"):
        import pandas as pd

        default_index = isinstance(obj.index, pd.RangeIndex) and obj.index.name is None
        with tempfile.TemporaryFile() as tmp:
            obj.to_csv(tmp, index=not default_index)
            tmp.flush()
            yield tmp, Path(name or "table.csv").name
        return
    if not isinstance(obj, str | os.PathLike):
        raise AirlockError(f"give a file's path or a pandas DataFrame, got {type(obj).__name__}")
    try:
        f = open(obj, "rb")  # noqa: SIM115 - the descriptor travels to the service
    except OSError as e:
        raise AirlockError(f"cannot open {obj}: {e.strerror}") from None
    with f:
        yield f, Path(name or obj).name


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
