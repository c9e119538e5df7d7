"""Previews of uploads for the project's reviewers: rendered from the canonical form, each one recorded first.

A preview is shown to a reviewer of the request's project (:meth:`Airlock.may_preview`: its stewards, and
admins holding the review scope) and to nobody else, the requester included: the requester's browser is
outside the workspace, and before release nothing of the upload goes there. What is shown is rendered from
the stored file, which is itself the upload's canonical re-encoding (:mod:`paitient.services.airlock.canonical`):
what a reviewer sees is what a release hands out. Every preview is written to the audit trail (who, which
request, the SHA-256 and size of the canonical bytes) before it is shown; if that record cannot be written,
the preview is refused. A refusal is recorded too.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable

from paitient.services.airlock.canonical import (
    PREVIEW_MAX_SOURCE_BYTES,
    Canonical,
    NoPreview,
    Page,
    Table,
    canonical_for,
)
from paitient.services.airlock.store import Request, Store


class PreviewUnrecorded(RuntimeError):
    """The preview's audit record could not be written, so the preview must not be shown."""


PREVIEW_CACHE = 8
"""Canonical forms kept in memory (by the upload's SHA-256), so a page view does not parse the upload again."""


class Previews:
    """The canonical forms of one airlock's uploads, and the recorded way to show them.

    ``emit``, ``may_preview`` and ``checked_form`` are the airlock's (:meth:`Airlock.emit`,
    :meth:`Airlock.may_preview`, :meth:`Airlock.checked_form`: the stored file, or the CSV cells of an XLSX).
    """

    def __init__(
        self,
        store: Store,
        *,
        emit: Callable[..., None],
        may_preview: Callable[[str, set[str], Request], bool],
        checked_form: Callable[[Request], tuple[Request, bytes]] | None = None,
    ):
        self.store = store
        self.checked_form = checked_form or (lambda req: (req, self.store.read_blob(req.sha256)))
        self.emit = emit
        self.may_preview = may_preview
        self._cache: dict[tuple[str, str, str, Page], Canonical | NoPreview] = {}
        self._lock = threading.Lock()

    def canonical(self, req: Request, page: Page | None = None) -> Canonical:
        """The canonical form of ``req``'s upload (of a table, one ``page``, the first by default); raises
        :class:`NoPreview` saying why there is none."""
        page = page or Page()
        key = (req.sha256, req.kind, os.path.splitext(req.filename)[1].lower(), page)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None and req.size > PREVIEW_MAX_SOURCE_BYTES:
            hit = NoPreview(
                f"the file has {req.size} bytes, more than the {PREVIEW_MAX_SOURCE_BYTES} a preview parses; "
                "review it from its checks"
            )
        if hit is None:
            try:
                shown, data = self.checked_form(req)
                hit = canonical_for(req.kind, shown.filename, data, page)
            except NoPreview as e:
                hit = e
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > PREVIEW_CACHE:
                    self._cache.pop(next(iter(self._cache)))
        if isinstance(hit, NoPreview):
            raise NoPreview(str(hit))
        form = req.meta.get("canonical") or {}
        if hit.kind == "image" and "dropped" in form:
            # The stored PNG carries nothing beyond its pixels; what the upload carried was left out at the request.
            return dataclasses.replace(hit, beyond=tuple(str(d) for d in form["dropped"]))
        return hit

    def unread(self, req: Request, username: str) -> tuple[Table | None, list[Page]]:
        """The pages of a table's preview ``username`` has not opened (none for a preview of one page), with
        the table's first page; :class:`NoPreview` for an upload with no preview."""
        table = self.canonical(req).table
        if table is None or len(table.pages) == 1:
            return table, []
        read = {
            Page(int(e.data.get("first_row", 0)), int(e.data.get("first_column", 0)))
            for e in self.store.events(req.id, "preview")
            if e.actor == username and e.data.get("sha256") == req.sha256
        }
        return table, [p for p in table.pages if p not in read]

    def record_details_read(self, req: Request, *, username: str) -> None:
        """A reviewer's browser gets the request's details through the JSON API (the checks' details quote the
        upload's cells; the justification whole): recorded in the audit trail first, as a page's preview is.
        Raises :class:`PreviewUnrecorded` when the record cannot be written: then they are not given."""
        try:
            self.emit(
                actor=username,
                action="airlock.preview",
                object=req.id,
                required=True,
                details={"project": req.project, "user": req.username, "via": "api", "file_sha256": req.sha256},
            )
        except Exception as e:
            raise PreviewUnrecorded(
                "the request's details could not be recorded in the audit trail, so they are not given; ask the "
                "workspace operator"
            ) from e

    def show(self, rid: str, *, username: str, scopes: set[str], via: str, page: Page | None = None) -> Canonical:
        """The preview of request ``rid`` (of a table, one ``page``) for one of its reviewers, recorded in the
        audit trail first and, for a table, in the request's history (approving a table of several pages
        needs every page read: :meth:`unread`).

        ``via`` says where it is shown (``page``, ``image``). Raises PermissionError (recorded) for anyone
        else, :class:`NoPreview` when the upload has none, and :class:`PreviewUnrecorded` when the audit record
        cannot be written: then nothing may be shown.
        """
        req = self.store.get(rid)
        if not self.may_preview(username, scopes, req):
            reason = (
                "previews are for the project's reviewers only: your browser gets the state, the checks and the "
                "decisions of your own request, and you download the file once it is released"
                if username == req.username
                else f"only reviewers of project {req.project} see previews of its requests"
            )
            self.emit(
                actor=username,
                action="airlock.preview",
                object=rid,
                outcome="denied",
                details={"project": req.project, "via": via, "reason": reason},
            )
            raise PermissionError(reason)
        shown = self.canonical(req, page)
        t = shown.table
        # Where the page shown starts, for a table read in several pages (recorded: approving needs them all).
        at = (
            {"first_row": t.page.first_row, "first_column": t.page.first_column, "pages": len(t.pages)}
            if t is not None and len(t.pages) > 1
            else {}
        )
        try:
            self.emit(
                actor=username,
                action="airlock.preview",
                object=rid,
                required=True,
                details={
                    "project": req.project,
                    "user": req.username,
                    "via": via,
                    "kind": shown.kind,
                    "sha256": shown.sha256,
                    "size": shown.size,
                    "file_sha256": req.sha256,
                    "upload_sha256": (req.meta.get("upload") or {}).get("sha256", req.sha256),
                    **({"page": at} if at else {}),
                },
            )
            if at:
                self.store.record_preview(rid, actor=username, data={**at, "sha256": req.sha256})
        except Exception as e:
            raise PreviewUnrecorded(
                "the preview could not be recorded in the audit trail, so it is not shown; ask the workspace operator"
            ) from e
        return shown
