"""The contents manager of the user's server: confined to the home, and every file body checked before
it leaves.

Paths: symlinks and ``..`` are resolved before the root check, so nothing outside the home is reached.

Bodies (``GET /api/contents/<path>`` with content) are what the browser can save, so they are egress:
- the file is read once, and what is sent is built from those bytes (a file swapped underneath after the
  check is not what goes);
- what it is comes from its bytes (:func:`paitient.rules.sniff.sniff`), not its name: notebooks, text and
  images are served, data formats and other binary never are, with a notice that says how outputs leave;
- text and notebooks go to the egress gate (:mod:`paitient.server.gate`), which finds the dataset rows they
  reveal: a text file showing too many is refused; in a notebook, each output is checked like a live one and
  replaced by the notice when withheld (its code and the rest of the notebook still open);
- directory listings go through the gate too, whole: names, sizes and times are all values the kernel chose
  (a listing the browser polls is checked again only when it changed since this server last sent it);
- a notebook goes out rebuilt from what was checked (its metadata, its cells and its format version), so a
  key the kernel added at its top level stays behind; a file that does not parse as a notebook is refused
  without quoting it.

Models without content (``content=0``) and error responses are checked by the output transform
(:mod:`paitient.server.routes`). A model's own fields (name, size, times: a kernel sets a file's times to
any value) are checked with its body. A GET with content leaves untouched only when this manager vouches for
the model (:data:`paitient.server.gate.BODY_CHECKED`): a path that is neither a file nor a folder is answered
here, never by the stock manager, which would look again and send whatever a kernel renamed there.

Copies inside the home (the file browser's Duplicate) read nothing out, so they are not checked.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from typing import Any

import nbformat
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado.web import HTTPError
from traitlets import Any as AnyTrait

from paitient.config import EgressLimits, Server, site_trait
from paitient.rules.egress import file_notice
from paitient.rules.sniff import Kind, sniff
from paitient.server.gate import BODY_CHECKED

_INTERNAL = contextvars.ContextVar("paitient_contents_internal", default=False)
"""Set while the manager reads files for its own work (copies), which sends nothing to the browser."""


def inside(root: str, path: str) -> bool:
    """True if ``path``, with every symlink resolved, lies in ``root`` (also resolved)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


REMEMBERED_LISTINGS = 1024
"""Folders whose last listing sent is remembered (by its SHA-256), the latest used."""


def _refuse(message: str) -> HTTPError:
    return HTTPError(403, message.replace("%", "%%"))


class ConfinedContentsManager(AsyncLargeFileManager):
    """The stock manager checks the unresolved path only and sends any file; this one confines paths and
    checks bodies."""

    max_content_bytes = site_trait(Server, "contents_cap_bytes")
    max_text_bytes = site_trait(EgressLimits, "contents_bytes")
    egress_gate = AnyTrait(None, allow_none=True, help="The server's egress gate (set by the server extension).")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._listings_sent: OrderedDict[str, bytes] = OrderedDict()

    def _get_os_path(self, path: str) -> str:
        os_path = super()._get_os_path(path)
        if not inside(self.root_dir, os_path):
            raise HTTPError(404, f"{path} is outside the home folder")
        return os_path

    async def copy(self, from_path: str, to_path: str | None = None) -> dict[str, Any]:
        token = _INTERNAL.set(True)
        try:
            return await super().copy(from_path, to_path)
        finally:
            _INTERNAL.reset(token)

    async def get(
        self,
        path: str,
        content: bool = True,
        type: str | None = None,
        format: str | None = None,
        require_hash: bool = False,
    ) -> dict[str, Any]:
        kwargs = {"require_hash": require_hash}
        if not content or _INTERNAL.get():
            return await super().get(path, content=content, type=type, format=format, **kwargs)
        path = path.strip("/")
        os_path = self._get_os_path(path)
        if os.path.isdir(os_path):
            model = await super().get(path, content=True, type=type, format=format, **kwargs)
            if model.get("type") != "directory":  # the folder became a file between the two looks
                raise HTTPError(409, f"{path} changed while it was read; open it again")
            await self._check_listing(path, _described(model, json.dumps(model.get("content") or [], default=str)))
            return _vouched(model)
        if not os.path.isfile(os_path):
            # Never the stock manager's read here: a file that appears now would go out unchecked.
            raise HTTPError(404, f"No such file or directory: {path}")
        data = self._read_capped(path, os_path)
        limit = self.max_text_bytes
        sniffed = sniff(data)
        if not sniffed.served:
            raise _refuse(file_notice(path, sniffed.what))
        if sniffed.kind is not Kind.IMAGE and limit and len(data) > limit:
            raise _refuse(
                f"{path} is larger than {limit:,} bytes and is not opened in the browser. It stays in your home: "
                "work with it in a notebook, or request an export through the airlock."
            )
        model = await super().get(path, content=False, type=type, format=format, **kwargs)
        if sniffed.kind is Kind.NOTEBOOK:
            if type not in (None, "notebook") or format not in (None, "json"):
                return _vouched(await self._as_file(model, path, data, "text/plain", format))
            return _vouched(await self._notebook(model, path, data))
        if type == "notebook":
            raise HTTPError(400, f"{path} is not a notebook")
        image = sniffed.kind is Kind.IMAGE
        return _vouched(await self._as_file(model, path, data, sniffed.mimetype, format, image=image))

    def _read_capped(self, path: str, os_path: str) -> bytes:
        cap = self.max_content_bytes
        with open(os_path, "rb") as f:
            data = f.read(cap + 1) if cap else f.read()
        if cap and len(data) > cap:
            raise _refuse(
                f"{path} is larger than {cap:,} bytes and is not opened here. It stays in your home: work with "
                "it in a notebook, or request an export through the airlock."
            )
        return data

    # -- asking the gate --------------------------------------------------------------------------

    def _gate(self) -> Any:
        if self.egress_gate is None:
            raise HTTPError(503, "the egress gate is not configured; ask the workspace operator")
        return self.egress_gate

    async def _check_whole(self, path: str, text: bytes, *, binary: bytes = b"", what: str = "") -> None:
        check = await self._gate().check(
            context=f"contents:{path}:{uuid.uuid4().hex}",
            channel="contents",
            object=path,
            text=text,
            binary=binary,
            final=True,
        )
        if not check.forward:
            raise _refuse(check.notice.replace("output withheld", f"{what or path} withheld", 1))

    async def _check_listing(self, path: str, text: bytes) -> None:
        """Check a folder's listing, unless it is the one this server last sent for that folder (the browser
        has it already: the file browser asks again every few seconds)."""
        digest = hashlib.sha256(text).digest()
        if self._listings_sent.get(path) != digest:
            self._listings_sent.pop(path, None)
            await self._check_whole(path, text, what="this folder's listing")
            self._listings_sent[path] = digest
            while len(self._listings_sent) > REMEMBERED_LISTINGS:
                self._listings_sent.popitem(last=False)
        self._listings_sent.move_to_end(path)

    async def _as_file(
        self, model: dict[str, Any], path: str, data: bytes, mimetype: str, format: str | None, *, image: bool = False
    ) -> dict[str, Any]:
        model["size"] = len(data)
        if image:
            await self._check_whole(path, _described(model), binary=data)
        else:
            await self._check_whole(path, _described(model, data.decode("utf-8", "replace")))
        if image or format == "base64":
            model.update(
                content=base64.encodebytes(data).decode("ascii"),
                format="base64",
                mimetype=mimetype or "application/octet-stream",
            )
        else:
            model.update(content=data.decode("utf-8"), format="text", mimetype=mimetype or "text/plain")
        model["type"] = "file"
        return model

    async def _notebook(self, model: dict[str, Any], path: str, data: bytes) -> dict[str, Any]:
        try:
            nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        except Exception as e:
            # nbformat's message quotes the file; the file is the kernel's
            raise HTTPError(
                400, f"Unreadable Notebook: {path} is not a notebook nbformat can read ({type(e).__name__})"
            ) from e
        model["size"] = len(data)
        await self._check_whole(path, _described(model), what=f"{path}'s name, size and times")
        gate = self._gate()
        base = f"contents:{path}:{uuid.uuid4().hex}"

        # Each cell is one output, as it was when it ran: its rows are limited like a live cell's; the day's
        # rows and bytes bound the notebook as a whole.
        async def check(context: str, text: bytes, binary: bytes = b"", final: bool = False) -> Any:
            return await gate.check(
                context=context, channel="contents", object=path, text=text, binary=binary, final=final
            )

        meta = await check(f"{base}:metadata", json.dumps(nb.metadata).encode(), final=True)
        if not meta.forward:
            nb.metadata = nbformat.from_dict({"kernelspec": nb.metadata.get("kernelspec", {})})
        for index, cell in enumerate(nb.cells):
            context = f"{base}:{index}"
            source = cell.get("source", "")
            rest = {k: v for k, v in cell.items() if k not in ("source", "outputs", "attachments")}
            attachments = json.dumps(cell.get("attachments", {})).encode()
            outputs_in = list(cell.get("outputs", ()))
            text = b"\n".join(
                (
                    (source if isinstance(source, str) else "".join(source)).encode(),
                    json.dumps(rest).encode(),
                    attachments,
                )
            )
            verdict = await check(context, text, final=not outputs_in)
            if not verdict.forward:
                cell["source"] = _comment(verdict.notice, cell.get("cell_type"))
                cell.pop("attachments", None)
                cell["metadata"] = {}
            outputs = []
            for n, output in enumerate(outputs_in):
                verdict = await check(context, json.dumps(output).encode(), final=n == len(outputs_in) - 1)
                outputs.append(
                    output
                    if verdict.forward
                    else nbformat.v4.new_output("stream", name="stderr", text=verdict.notice + "\n")
                )
            if "outputs" in cell:
                cell["outputs"] = outputs
        nb = _rebuilt(nb)
        self.mark_trusted_cells(nb, path)
        model.update(content=nb, format="json", type="notebook", mimetype=None, size=len(data))
        self.validate_notebook_model(model)
        return model


def _described(model: dict[str, Any], content: str = "") -> bytes:
    """What the gate reads of a model besides its body: its name, path, size, times and flags (the kernel sets
    a file's times to any value it likes), then ``content``."""
    fields = {k: v for k, v in model.items() if k != "content"}
    return (json.dumps(fields, sort_keys=True, default=str) + "\n" + content).encode()


def _vouched(model: dict[str, Any]) -> dict[str, Any]:
    """``model``, built from what the gate passed: its response may leave untouched (:data:`BODY_CHECKED`)."""
    BODY_CHECKED.set(True)
    return model


def _rebuilt(nb: Any) -> Any:
    """The notebook of ``nb``'s checked parts only: its metadata, its cells and its format's minor version
    (kept where it is one nbformat knows); any other top-level key stays behind."""
    minor = nb.get("nbformat_minor")
    known = isinstance(minor, int) and not isinstance(minor, bool) and 0 <= minor <= nbformat.v4.nbformat_minor
    return nbformat.from_dict(
        {
            "nbformat": 4,
            "nbformat_minor": minor if known else nbformat.v4.nbformat_minor,
            "metadata": nb.metadata,
            "cells": nb.cells,
        }
    )


def _comment(notice: str, cell_type: str | None) -> str:
    return notice if cell_type != "code" else "# " + notice.replace("\n", "\n# ")
