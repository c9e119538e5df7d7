"""The researcher's side of the airlock, inside a kernel: submit an output, see what became of it.

The kernel has no network. It opens the file itself and hands the open descriptor to the airlock service
over the unix socket ``$PAITIENT_RUN_DIR/airlock.sock``; the service knows the caller from the socket's
peer credentials and takes a copy out of the user's reach.
"""

from __future__ import annotations

import html
import inspect
import os
from pathlib import Path
from typing import Any

from paitient.channel import ChannelError, ServiceClient

KINDS = ("table", "figure", "weights", "other")


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
        return self.call("request", args, fds=[fd])

    def status(self, request_id: str) -> dict[str, Any]:
        return self.call("status", {"id": request_id})

    def requests(self) -> list[dict[str, Any]]:
        """The caller's own requests, newest first."""
        return self.call("list", {})


def request(
    path: str | os.PathLike[str],
    *,
    kind: str,
    justification: str,
    project: str | None = None,
    model_source: str | type | None = None,
    model_class: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    target: str | None = None,
    features: list[str] | None = None,
    loss: str = "cross_entropy",
    split: dict[str, Any] | None = None,
    preprocess: str = "none",
    dataset: str | None = None,
    recipe: dict[str, Any] | None = None,
    supersedes: str | None = None,
) -> str:
    """Ask the airlock to release the file at ``path``; return the request id.

    ``kind``: ``table`` (CSV or Parquet; give ``recipe=`` — dataset, index, columns, values, aggfunc — so
    the dominance and p-ratio rules can be checked), ``figure``, ``weights`` (safetensors from
    ``paitient.kernel.dp`` training) or ``other``. For weights, the membership-inference audit needs the model:
    ``model_source`` (the class itself, or its Python source), ``model_kwargs``, ``target`` (and
    ``features``, default all other columns), ``loss`` (cross_entropy, bce, mse), ``preprocess``
    (``none`` or ``standardize`` with the training rows' mean and std) and the train/holdout ``split``
    (``{"holdout": 0.3, "seed": 0}`` as made by :func:`paitient.kernel.airlock.split_indices`, or
    ``{"train_rows": [...]}``).
    """
    if kind not in KINDS:
        raise AirlockError(f"kind must be one of {', '.join(KINDS)}")
    args: dict[str, Any] = {"kind": kind, "justification": justification, "filename": Path(path).name}
    if project:
        args["project"] = project
    if recipe is not None:
        args["recipe"] = recipe
    if supersedes:
        args["supersedes"] = supersedes
    if kind == "weights" and model_source is not None:
        if isinstance(model_source, type):
            model_class = model_class or model_source.__name__
            model_source = _class_source(model_source)
        args["model"] = {
            "source": model_source,
            "class": model_class or "Model",
            "kwargs": model_kwargs or {},
            "target": target,
            "features": features,
            "loss": loss,
            "split": split,
            "preprocess": preprocess,
            **({"dataset": dataset} if dataset else {}),
        }
    try:
        f = open(path, "rb")  # noqa: SIM115 - the descriptor travels to the service
    except OSError as e:
        raise AirlockError(f"cannot open {path}: {e.strerror}") from None
    with f:
        result = AirlockClient().submit(args, f.fileno())
    return result["id"]


def _class_source(cls: type) -> str:
    """Source defining ``cls``: its whole module if it comes from a file, else the notebook cell's class."""
    module = inspect.getmodule(cls)
    try:
        if module is not None and module.__name__ != "__main__":
            return inspect.getsource(module)
        body = inspect.getsource(cls)
    except (OSError, TypeError):
        body = _class_from_history(cls.__name__)
    return "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n" + body


def _class_from_history(name: str) -> str:
    """The latest definition of class ``name`` in this IPython session's input history."""
    import ast

    try:
        from IPython import get_ipython

        cells = list((get_ipython().user_ns.get("In") or []) if get_ipython() else [])
    except ImportError:
        cells = []
    for cell in reversed(cells):
        try:
            tree = ast.parse(cell)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return ast.get_source_segment(cell, node, padded=True) or ""
    raise AirlockError(f"cannot find the source of {name}; pass model_source as a string")


class Requests(list):
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
