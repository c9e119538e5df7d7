"""The contents manager of the user's server: confined to the home, and every file body checked before
it leaves.

Paths: symlinks and ``..`` are resolved before the root check, so nothing outside the home is reached.

Bodies (``GET /api/contents/<path>`` with content) are what the browser can save, so they are egress:
- the file is read once, and what is sent is built from those bytes (a file swapped underneath after the
  check is not what goes);
- what it is comes from its bytes (:func:`paitient.rules.sniff.sniff`), not its name: notebooks, text and
  images are served, data formats and other binary never are, with a notice that says how outputs leave; an
  image is one only when it is that format to its last byte (a table behind a PNG signature is data), and
  what it carries besides its pixels (text chunks, profiles, Exif, comments) is read for rows with its name;
- text and notebooks go to the egress gate (:mod:`paitient.server.gate`), which finds the dataset rows they
  reveal: a text file showing too many is refused; in a notebook, each output is checked like a live one and
  replaced by the notice when withheld (its code and the rest of the notebook still open);
- directory listings go through the gate too, whole: names, sizes and times are all values the kernel chose
  (a listing the browser polls is checked again only when it changed since this server last sent it);
- what the gate reads is the text as the browser shows it: JSON is serialised for the check with its
  non-ASCII characters as they are (``ensure_ascii=False``), not as ``\\uXXXX`` escapes that would hide
  full-width and other digits from the row detection;
- a notebook goes out rebuilt, and what is checked is the JSON of the very parts that are sent: new cells of
  the format's own fields only (a key the kernel added to a cell or at the top level stays behind), each of
  the type the format gives it; a withheld cell becomes a brand-new cell with the notice, withheld
  metadata the server's own description of the kernel it names (if this server has it). A cell or output
  that does not follow the format (a source that is not text, an output with a key of its own) is replaced
  by a notice saying so, a repeated cell id by a fresh one, and the notebook sent is validated again; a
  file that does not parse as a notebook is refused without quoting it.

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
import re
import stat
import uuid
from collections import OrderedDict
from typing import Any

import nbformat
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado.web import HTTPError
from traitlets import Any as AnyTrait

from paitient.config import EgressLimits, Server, site_trait
from paitient.rules.egress import file_notice
from paitient.rules.shown import merged_streams
from paitient.rules.sniff import Kind, sniff
from paitient.server.gate import BODY_CHECKED

_INTERNAL = contextvars.ContextVar("paitient_contents_internal", default=False)
"""Set while the manager reads files for its own work (copies), which sends nothing to the browser."""


def inside(root: str, path: str, *, resolved: bool = False) -> bool:
    """True if ``path``, with every symlink resolved, lies in ``root`` (also resolved). ``resolved``: ``path``
    is a resolved one already (the kernel's name of an open file), taken as it is."""
    real_root = os.path.realpath(root)
    real = path if resolved else os.path.realpath(path)
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
            listing = json.dumps(model.get("content") or [], ensure_ascii=False, default=str)
            await self._check_listing(path, _described(model, listing))
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
        image = sniffed.carried if sniffed.kind is Kind.IMAGE else None
        return _vouched(await self._as_file(model, path, data, sniffed.mimetype, format, image=image))

    def _read_capped(self, path: str, os_path: str) -> bytes:
        """The file's bytes, read from what was opened: the path was checked before, and a kernel may have
        swapped it for a symlink out of the home, or a FIFO, since. What the descriptor names is checked."""
        cap = self.max_content_bytes
        try:
            fd = os.open(os_path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HTTPError(404, f"No such file or directory: {path}") from None
        except OSError as e:
            raise HTTPError(403, f"{path} cannot be opened ({e.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            if not inside(self.root_dir, os.readlink(f"/proc/self/fd/{fd}"), resolved=True):
                raise HTTPError(404, f"{path} is outside the home folder")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise HTTPError(409, f"{path} is not a file (it changed while it was read); open it again")
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
        self,
        model: dict[str, Any],
        path: str,
        data: bytes,
        mimetype: str,
        format: str | None,
        *,
        image: bytes | None = None,
    ) -> dict[str, Any]:
        """``image``: for an image, what it carries besides its pixels (read as text; the file is counted)."""
        model["size"] = len(data)
        if image is not None:
            await self._check_whole(path, _described(model, image.decode("utf-8", "replace")), binary=data)
        else:
            await self._check_whole(path, _described(model, data.decode("utf-8", "replace")))
        if image is not None or format == "base64":
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
        # rows and bytes bound the notebook as a whole. What is checked is the JSON of the very objects that
        # are sent (rebuilt here, as the browser will read them): nothing rides along unchecked.
        async def check(context: str, piece: Any, final: bool = False) -> Any:
            return await gate.check(context=context, channel="contents", object=path, text=_text(piece), final=final)

        minor = _minor(nb)
        unreadable = 0
        metadata = nb.get("metadata")
        if not isinstance(metadata, dict) or not _fits(
            {"nbformat": 4, "nbformat_minor": minor, "metadata": metadata, "cells": []}, None, minor
        ):
            unreadable += 1
            metadata = self._plain_metadata(metadata)
        elif not (await check(f"{base}:metadata", metadata, final=True)).forward:
            metadata = self._plain_metadata(metadata)
        cells_in = nb.get("cells")
        cells: list[dict[str, Any]] = []
        ids: set[str] = set()
        for index, cell in enumerate(cells_in if isinstance(cells_in, list) else ()):
            context = f"{base}:{index}"
            rebuilt = _cell(cell, minor)
            if rebuilt is None:
                unreadable += 1
                kind = cell.get("cell_type") if isinstance(cell, dict) else None
                rebuilt = _notice_cell(UNREADABLE_CELL, kind if kind in CELL_TYPES else "markdown", minor)
            if "id" in rebuilt:  # ids are unique in a notebook: a repeated one is replaced, as nbformat repairs it
                while rebuilt["id"] in ids:
                    rebuilt["id"] = uuid.uuid4().hex[:8]
                ids.add(rebuilt["id"])
            outputs_in = rebuilt.pop("outputs", None)
            # consecutive stream outputs of one name are one text in JupyterLab, which joins them as it loads
            # the notebook: so they are checked, and sent, as one
            outputs_in = merged_streams(outputs_in) if isinstance(outputs_in, list) else None
            verdict = await check(context, rebuilt, final=not outputs_in)
            if not verdict.forward:
                rebuilt = _notice_cell(verdict.notice, rebuilt["cell_type"], minor)
                ids.add(rebuilt.get("id", ""))
            if rebuilt["cell_type"] == "code":
                outputs = []
                for n, output in enumerate(outputs_in or ()):
                    if not _fits(output, "output", minor):
                        unreadable += 1
                        output = _notice_output(UNREADABLE_OUTPUT)
                    verdict = await check(context, output, final=n == len(outputs_in or ()) - 1)
                    outputs.append(output if verdict.forward else _notice_output(verdict.notice))
                rebuilt["outputs"] = outputs
            cells.append(rebuilt)
        sent = nbformat.from_dict({"nbformat": 4, "nbformat_minor": minor, "metadata": metadata, "cells": cells})
        if not _fits(sent, None, minor):
            # every part was rebuilt to the format above; a notebook that still fails is not sent at all
            raise HTTPError(400, f"Unreadable Notebook: {path} is not in the notebook format and is not opened")
        self.mark_trusted_cells(sent, path)
        model.update(content=sent, format="json", type="notebook", mimetype=None, size=len(data))
        if unreadable:
            model["message"] = (
                f"{path}: {unreadable} part{'s' if unreadable > 1 else ''} of this notebook that do not follow the "
                "notebook format are not shown (replaced by a notice or left out)."
            )
        return model

    def _plain_metadata(self, metadata: Any) -> dict[str, Any]:
        """Metadata in place of metadata that is withheld or not in the format: only a kernelspec, and that
        only when it names a kernel this server has, described by the server's own spec (not by the file)."""
        spec = metadata.get("kernelspec") if isinstance(metadata, dict) else None
        name = spec.get("name") if isinstance(spec, dict) else None
        try:
            specs = getattr(self.parent, "kernel_spec_manager", None)
            if specs is None:
                return {}
            if not isinstance(name, str) or name not in specs.find_kernel_specs():
                return {}
            own = specs.get_kernel_spec(name)
        except Exception:
            return {}
        return {"kernelspec": {"name": name, "display_name": str(own.display_name), "language": str(own.language)}}


CELL_TYPES = ("code", "markdown", "raw")
UNREADABLE_CELL = "This cell is not in the notebook format and is not shown."
UNREADABLE_OUTPUT = "This output is not in the notebook format and is not shown."
CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")


def _text(piece: Any) -> bytes:
    """What the gate reads of a piece of a notebook: its JSON with every character as the browser shows it
    (not as a ``\\uXXXX`` escape, which would hide full-width digits and the like from the row detection)."""
    return json.dumps(piece, ensure_ascii=False).encode("utf-8", "replace")


def _minor(nb: Any) -> int:
    """The notebook's format minor version where it is one nbformat knows, else the current one."""
    minor = nb.get("nbformat_minor")
    known = isinstance(minor, int) and not isinstance(minor, bool) and 0 <= minor <= nbformat.v4.nbformat_minor
    return minor if known else nbformat.v4.nbformat_minor


def _fits(piece: Any, ref: str | None, minor: int) -> bool:
    """True if ``piece`` follows the notebook format (``ref``: the part of the schema, None for a notebook)."""
    try:
        return bool(nbformat.validator.isvalid(piece, ref=ref, version=4, version_minor=minor))
    except Exception:
        return False


def _cell(cell: Any, minor: int) -> dict[str, Any] | None:
    """A new cell of ``cell``'s fields that the format has, each of the type it has there; any other key stays
    behind. None when the cell is not one (its type unknown, its source not text)."""
    if not isinstance(cell, dict) or cell.get("cell_type") not in CELL_TYPES:
        return None
    source = cell.get("source", "")
    if isinstance(source, list) and all(isinstance(line, str) for line in source):
        source = "".join(source)
    if not isinstance(source, str):
        return None
    metadata = cell.get("metadata")
    new: dict[str, Any] = {"cell_type": cell["cell_type"], "metadata": metadata if isinstance(metadata, dict) else {}}
    if minor >= 5:
        cell_id = cell.get("id")
        new["id"] = cell_id if isinstance(cell_id, str) and CELL_ID.match(cell_id) else uuid.uuid4().hex[:8]
    new["source"] = source
    if cell["cell_type"] == "code":
        count = cell.get("execution_count")
        new["execution_count"] = (
            count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
        )
        new["outputs"] = []
    elif isinstance(cell.get("attachments"), dict):
        new["attachments"] = cell["attachments"]
    ref = f"{cell['cell_type']}_cell"
    if not _fits(new, ref, minor):
        new["metadata"] = {}
        new.pop("attachments", None)
        if not _fits(new, ref, minor):
            return None
    if cell["cell_type"] == "code":
        new["outputs"] = cell.get("outputs")
    return new


def _notice_cell(notice: str, cell_type: str, minor: int) -> dict[str, Any]:
    """A brand-new cell that shows ``notice``: nothing of the cell it replaces."""
    new: dict[str, Any] = {"cell_type": cell_type, "metadata": {}}
    if minor >= 5:
        new["id"] = uuid.uuid4().hex[:8]
    new["source"] = _comment(notice, cell_type)
    if cell_type == "code":
        new.update(execution_count=None, outputs=[])
    return new


def _notice_output(notice: str) -> dict[str, Any]:
    return {"output_type": "stream", "name": "stderr", "text": notice + "\n"}


def _described(model: dict[str, Any], content: str = "") -> bytes:
    """What the gate reads of a model besides its body: its name, path, size, times and flags (the kernel sets
    a file's times to any value it likes), then ``content``."""
    fields = {k: v for k, v in model.items() if k != "content"}
    described = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    # as the browser shows it: a name in full-width digits is read as digits, not as ``\\uff11`` escapes; a
    # name that is not UTF-8 (its bytes kept as lone surrogates) is read with those replaced
    # the body as a JSON string, as every other text the gate reads: the egress service undoes JSON's escapes,
    # which a file may spell literally (``0.1184\\u0041`` is not ``0.1184A``)
    body = json.dumps(content, ensure_ascii=False) if content else ""
    return (described + "\n" + body).encode("utf-8", "replace")


def _vouched(model: dict[str, Any]) -> dict[str, Any]:
    """``model``, built from what the gate passed: its response may leave untouched (:data:`BODY_CHECKED`)."""
    BODY_CHECKED.set(True)
    return model


def _comment(notice: str, cell_type: str | None) -> str:
    return notice if cell_type != "code" else "# " + notice.replace("\n", "\n# ")
