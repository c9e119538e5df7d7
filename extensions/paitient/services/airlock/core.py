"""The airlock's logic: taking requests from kernels, running the checks, and who may see, decide and
download what. The socket (:mod:`paitient.services.kit.channel`) and the web pages
(:mod:`paitient.services.airlock.web`) are thin layers around :class:`Airlock`;
:func:`paitient.services.airlock.service.serve` runs them together. The weights check asks the privacy
ledger over its socket (:class:`paitient.services.ledger.api.LedgerReader`), as root: never its database.

Submitted files go to the root-only store (:mod:`paitient.services.airlock.store`); a worker thread runs the
automatic checks (:mod:`paitient.services.airlock.checks`) one request at a time and hands the request to review.
:meth:`Airlock.start` re-queues every request a restart interrupted (submitted or being checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import stat
import threading
import time
import unicodedata
from typing import Any

from paitient import sysaccounts
from paitient.channel import BAD_REQUEST, FORBIDDEN, NOT_FOUND, RATE_LIMITED, TOO_LARGE, ChannelError, Peer
from paitient.config import AIRLOCK_KINDS, SiteConfig
from paitient.registry import Member, Registry
from paitient.rules import disclosure, review
from paitient.rules.disclosure import Labels, TableRules, result
from paitient.rules.fixes import fix_for
from paitient.rules.records import Event
from paitient.services.airlock import published, views
from paitient.services.airlock.canonical import (
    MAX_SOURCE_BYTES,
    TABLE_FORMATS,
    NoPreview,
    Output,
    Refused,
    canonical_output,
    frame_csv,
)
from paitient.services.airlock.checks import CheckContext, computed_table, load_published, run_checks
from paitient.services.airlock.feedback import BUSY, Bounded
from paitient.services.airlock.mia import prepare_work_root
from paitient.services.airlock.previews import Previews, PreviewUnrecorded
from paitient.services.airlock.published import PublishedIndex
from paitient.services.airlock.releases import ReleasedTables
from paitient.services.airlock.settings import SCOPE_DOWNLOAD, SCOPE_REQUEST, SCOPE_REVIEW, AirlockSettings
from paitient.services.airlock.store import DAY, ReleasedFile, Request, Store, StoreError, TooManyRequests
from paitient.services.airlock.store import Event as RequestEvent
from paitient.services.audit import trail_writer
from paitient.services.kit.backlog import Backlog, HeldRecords
from paitient.services.ledger.api import LedgerReader

MAX_JUSTIFICATION = 10_000
BACKLOG_RETRY = 5.0
"""Seconds between the check worker's tries to write the records that wait for the trail, while any wait."""
MAX_MODEL_SOURCE = 200_000


def unrecordable(what: str, outcome: str) -> str:
    """What a researcher or steward is told when the audit trail cannot record ``what``, so it is ``outcome``."""
    return (
        f"the audit trail cannot record {what} right now, so it is {outcome}; try again in a moment, and tell the "
        "workspace operator if it goes on"
    )


FILENAME_CHARS = 100
"""Most characters of a released file's name."""


def _clean_filename(name: Any) -> str:
    """The name a file is stored and released under: letters and digits of ASCII, ``.``, ``_``, ``-`` and single
    spaces only, at most :data:`FILENAME_CHARS` of them. Accents are dropped (``é`` is ``e``), compatibility forms
    taken as their letters (fullwidth ``Ａ`` is ``A``), every other character is ``_``. A name travels in the
    download's Content-Disposition, its link and the JSON API, where a character a page shows as nothing (a
    variation selector, a filler, an odd space) or one that looks like another (Cyrillic ``а``) would carry
    bits the steward never saw: the steward sees exactly the name that leaves, character for character."""
    name = os.path.basename(str(name or "").replace("\\", "/"))
    name = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", name)
    name = re.sub(r"_{2,}", "_", re.sub(r" {2,}", " ", name))
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix) > 10 or not suffix.strip(" ._"):
        stem, suffix = name, ""
    stem = stem[: FILENAME_CHARS - len(suffix) - 1].strip(" .") or "output"
    return stem + "." + suffix.strip(" ") if suffix.strip(" ") else stem


@dataclasses.dataclass(frozen=True)
class GraphStanding:
    """Where the graph of a request's certified weights stands for automatic release in its project:
    listed in the site file (``in_site``), and the stewards' approvals since the last revocation (events of
    the requests they were given on) that count for this request, of which ``needed`` (the project's
    ``approvals``) make it approved. ``in_force``: every approval since the last revocation by a steward of
    the project now, the requester's own included (it counts for colleagues' weights, and is revoked here
    too)."""

    sha256: str
    in_site: bool
    approvals: tuple[RequestEvent, ...]
    needed: int
    in_force: tuple[RequestEvent, ...]

    @property
    def approved(self) -> bool:
        return self.in_site or len(self.approvals) >= self.needed


READ_TURN_SECONDS = 120.0
"""How long a request waits for the same account's earlier ones to be read into their release form."""


class Airlock:
    """The service's logic over its store; the socket and web layers are thin around it."""

    def __init__(
        self,
        site: SiteConfig,
        *,
        settings: AirlockSettings | None = None,
        store: Store | None = None,
        ledger: LedgerReader | None = None,
        lookup_run=None,
        emit=None,
        log: logging.Logger | None = None,
    ):
        self.site = site
        self.settings = settings or AirlockSettings()
        self.store = store or Store.for_site(site)
        self.registry = Registry.for_state_dir(site.state_dir)
        self.log = log or logging.getLogger("paitient.services.airlock")
        self._write_records = trail_writer(site, emit)
        self.ledger = ledger or LedgerReader(site.run_dir)
        self._lookup_run = lookup_run
        self.published = PublishedIndex(site.data_root)
        self.tables = ReleasedTables(self.store)
        self._matcher: Any = None
        self.audit_work_root = site.state_dir / "airlock-audit"
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self.previews = Previews(
            self.store, emit=self.emit, may_preview=self.may_preview, checked_form=self.checked_form
        )
        self.feedback = Bounded(self.settings.check_concurrency, self.settings.check_timeout)
        self._reading: dict[str, threading.Lock] = {}
        """An account's uploads are read into their release form one at a time (the next waits its turn)."""
        self._reading_lock = threading.Lock()
        self.backlog = Backlog(HeldRecords(self.store.db), self._write_records, self.log, "airlock")
        """Records the trail refused and that did not have to be written first; the check worker retries them."""

    # ------------------------------------------------------------------------------------------------
    # Collaborators

    def emit(
        self,
        *,
        actor: str,
        action: str,
        object: str,
        outcome: str = "ok",
        details: dict[str, Any] | None = None,
        required: bool = False,
    ) -> None:
        """Write an audit record; if ``required``, a failure to write it raises (the action must not happen).
        Otherwise a record the trail cannot take waits for it (:attr:`backlog`, held in the store's database)."""
        event = Event(actor=actor, action=action, object=object, outcome=outcome, details=details or {})
        if not required:
            self.backlog.write([event])
            return
        try:
            self._write_records([event])
        except Exception:
            self.log.exception("could not write the audit record %s %s", action, object)
            raise

    def lookup_run(self, sha256: str) -> dict[str, Any] | None:
        """The ledger's settled run for these weights (asked over its socket); raises ChannelError if it is down."""
        if self._lookup_run is not None:
            return self._lookup_run(sha256)
        return self.ledger.record_by_hash(sha256)

    def budget_for(self, project: str, dataset: str):
        """The dataset's total budget as the ledger applies it (a KeyError for a dataset it does not know)."""
        return self.ledger.total(project, dataset)

    def check_context(self) -> CheckContext:
        s = self.settings
        return CheckContext(
            rules=TableRules(
                min_count=s.min_count, nk_n=s.nk_n, nk_k=s.nk_k, p_ratio=s.p_ratio, zeros_disclosive=s.zeros_disclosive
            ),
            lookup_run=self.lookup_run,
            budget_for=self.budget_for,
            load_dataset=self._load_dataset,
            current_version=self._current_version,
            published=self.published.files,
            mia_max_auc=s.mia_max_auc,
            mia_max_advantage=s.mia_max_advantage,
            audit_account=s.audit_account,
            prepare_audit_account=self.audit_account,
            audit_timeout=s.audit_timeout,
            audit_memory_mb=self.site.sandbox.memory_mb,
            audit_work_root=str(self.audit_work_root),
            jobs_public_key=self.jobs_public_key,
            self_reported_policy=self._self_reported_policy,
            labels=self.table_labels,
            catalogue_columns=self.catalogue_columns,
            reveal=self.reveal_rows,
            stage_table=self.tables.stage,
            earlier_tables=self.tables.earlier,
        )

    def audit_account(self) -> str:
        """The audit's dedicated account, made and recorded at the first audit if it does not exist."""
        name = self.settings.audit_account
        try:
            sysaccounts.ensure_worker_account(self.site.state_dir, name, sysaccounts.AUDIT)
        except sysaccounts.SystemAccountError as e:
            raise RuntimeError(str(e)) from None
        return name

    def table_labels(self, project: str) -> Labels:
        """What text the project's tables may hold: the column names the catalogue lists for every published
        version of its datasets, the categories it lists for the current one, and the project's
        ``table_labels``."""
        texts: list[Any] = list(self.site.project(project).table_labels)
        for name, categories in self.catalogue_columns(project).items():
            texts.append(name)
            texts.extend(categories)
        return Labels.of(texts)

    def catalogue_columns(self, project: str) -> dict[str, frozenset[str]]:
        """The columns of the project's datasets (every published version), each with the categories the
        catalogue lists for it in the dataset's current version (none for a column of numbers). Only the
        current one's: a value the data team generalised away in a later version (a rare occupation made
        'other') is no label any more, and versions published before the catalogue counted patients listed
        values that one patient held on many rows."""
        from paitient.services.data.publish import current_version, dataset_dir, read_manifest, versions

        out: dict[str, set[str]] = {}
        for name in self.site.project(project).datasets:
            ds = dataset_dir(self.site.data_root, project, name)
            current = current_version(ds)
            for version in versions(ds):
                for column in (read_manifest(ds, version) or {}).get("columns", []):
                    if isinstance(column, dict) and isinstance(column.get("name"), str):
                        categories = out.setdefault(column["name"], set())
                        if version == current:
                            categories.update(map(str, column.get("categories") or []))
        return {name: frozenset(cats) for name, cats in out.items()}

    def reveal_rows(self, project: str, text: bytes) -> dict[str, int]:
        """Rows of the project's datasets ``text`` reveals, by the exact-data-match indexes the egress gate uses
        (loaded here, as root, from the same files); a missing index raises LookupError."""
        if self._matcher is None:
            from paitient.services.egress.matcher import Matcher

            self._matcher = Matcher(self.site, log=self.log)
        return {key: len(rows) for key, rows in self._matcher.reveal(text, [project]).items()}

    def _self_reported_policy(self, project: str) -> tuple[str, str]:
        p = self.site.project(project)
        return p.self_reported_weights, p.self_reported_reason

    def approvals_needed(self, req: Request) -> int:
        """Independent approvals ``req`` needs; :class:`review.TransitionError` if its project refuses it
        (self-reported weights under the default policy). Weights count as certified only when their request
        came from a job and the airlock's own check of the runner's signature passed."""
        project = self.site.project(req.project)
        certified = bool(req.meta.get("job")) and any(
            c["check"] == "certified" and c["status"] == "pass" for c in self.store.checks(req.id)
        )
        return review.approvals_for(
            project=req.project,
            kind=req.kind,
            certified=certified,
            project_approvals=project.approvals,
            self_reported_policy=project.self_reported_weights,
        )

    def jobs_public_key(self) -> Any:
        """The training runner's published public key; OSError when there is none yet."""
        from paitient.services.jobs.keys import load_public_key, public_key_path

        return load_public_key(public_key_path(self.site))

    def _current_version(self, project: str, dataset: str) -> int | None:
        from paitient.services.data.publish import current_version, dataset_dir

        return current_version(dataset_dir(self.site.data_root, project, dataset.split("/")[-1]))

    def _load_dataset(self, project: str, dataset: str, version: Any):
        name = dataset.split("/")[-1]
        if name not in self.site.project(project).datasets:
            raise KeyError(f"{name!r} is not a dataset of project {project!r}")
        return load_published(self.site.data_root, project, name, version)

    # ------------------------------------------------------------------------------------------------
    # Kernel side (unix socket)

    def handlers(self) -> dict[str, Any]:
        return {
            "request": self.op_request,
            "request_job": self.op_request_job,
            "check": self.op_check,
            "status": self.op_status,
            "list": self.op_status,
        }

    def _caller(self, peer: Peer) -> Member:
        member = self.registry.by_uid(peer.uid)
        if member is None:
            raise ChannelError(f"uid {peer.uid} is not a paitient account; sign in through the workspace", FORBIDDEN)
        return member

    def _named_project(self, args: dict[str, Any]) -> str | None:
        """The project a refused call named, for its audit record: one of the site's (a non-member's attempt is
        its stewards' business), or none: the record's project decides who reads it, and a kernel does not
        get to write any other name there."""
        project = args.get("project")
        return project if isinstance(project, str) and project in {p.name for p in self.site.projects} else None

    def op_request(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        member = self._caller(peer)
        try:
            kind, project, justification, meta = self._validate_request(member, args)
        except ChannelError as e:
            self.emit(
                actor=member.username,
                action="airlock.request",
                object="",
                outcome="denied",
                details={"reason": str(e), "project": self._named_project(args)},
            )
            raise
        if kind == "weights" and self.site.project(project).self_reported_weights != review.TWO_PERSON:
            reason = review.self_reported_refusal(project)
            self.emit(
                actor=member.username,
                action="airlock.request",
                object="",
                outcome="denied",
                details={
                    "reason": reason,
                    "project": project,
                    "kind": kind,
                    "filename": _clean_filename(args.get("filename")),
                },
            )
            raise ChannelError(reason, FORBIDDEN)
        _one_regular_file(fds)
        filename = _clean_filename(args.get("filename"))
        denied = {"project": project, "kind": kind, "filename": filename}
        self._within_quota(member, denied)
        limit = self.settings.max_bytes if kind == "weights" else min(self.settings.max_bytes, MAX_SOURCE_BYTES)
        with self._reading_lock:
            turn = self._reading.setdefault(member.username, threading.Lock())
        if not turn.acquire(timeout=READ_TURN_SECONDS):
            raise ChannelError(
                f"your earlier requests were still being read after {READ_TURN_SECONDS:g} s; file this one again "
                "once they are answered",
                BUSY,
            )
        try:
            upload = _read_all(fds[0], limit)
            out = self._release_form(kind, filename, upload, meta)
        except (StoreError, Refused) as e:
            self.emit(
                actor=member.username,
                action="airlock.request",
                object="",
                outcome="denied",
                details={"reason": str(e), **denied},
            )
            raise ChannelError(str(e), "refused") from None
        finally:
            turn.release()
        # Only the canonical form is kept: the upload's bytes are never stored, so nothing but what the checks
        # judge, the reviewers see and a release hands out can leave. Its hash and size stay, for the audit.
        try:
            sha, size = self.store.put_blob(out.data)
            canonical: dict[str, Any] = {"form": out.form, "dropped": list(out.dropped)}
            if out.quoted:
                canonical["quoted"] = out.quoted
            if out.cells:
                canonical["cells_sha256"] = self.store.put_blob(out.cells)[0]
        except (StoreError, OSError) as e:
            raise ChannelError(
                f"the airlock could not store the file ({e}); ask the workspace operator", "refused"
            ) from None
        upload_sha = hashlib.sha256(upload).hexdigest()
        meta["upload"] = {"sha256": upload_sha, "size": len(upload), "filename": filename}
        meta["canonical"] = canonical
        details = {
            "project": project,
            "kind": kind,
            "filename": out.filename,
            "sha256": sha,
            "size": size,
            "form": out.form,
            "upload_filename": filename,
            "upload_sha256": upload_sha,
            "upload_size": len(upload),
        }
        req = self._file(
            member,
            details,
            project=project,
            username=member.username,
            account=member.account,
            uid=peer.uid,
            kind=kind,
            filename=out.filename,
            sha256=sha,
            size=size,
            justification=justification,
            meta=meta,
        )
        self._queue.put(req.id)
        return {
            "id": req.id,
            "state": req.state,
            "project": project,
            "sha256": sha,
            "size": size,
            "filename": out.filename,
            "upload_sha256": upload_sha,
        }

    def op_request_job(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Request the release of a training job's weights: the airlock takes them and their signed record
        from the runner itself (the kernel sends only the job's id), and refuses a record that does not hold."""
        from paitient.rules import training_record
        from paitient.services.jobs.api import JobsReader

        member = self._caller(peer)
        job_id = args.get("job_id")
        if not isinstance(job_id, str) or not re.fullmatch(r"job-[0-9a-f]{6,32}", job_id):
            raise ChannelError("job_id must be a training job's id (job.id)", BAD_REQUEST)
        wire = {k: v for k, v in args.items() if k in ("justification", "project")}
        try:
            envelope, data, graph = JobsReader(self.site.run_dir).release(job_id, member.username)
            record = training_record.verify(envelope, self.jobs_public_key(), data)
            project = record["project"]
            _, project, justification, _ = self._validate_request(
                member, {**wire, "kind": "weights", "project": project}
            )
        except (ChannelError, training_record.RecordInvalid, OSError) as e:
            self.emit(
                actor=member.username,
                action="airlock.request",
                object=job_id,
                outcome="denied",
                details={"reason": str(e), "kind": "weights", "job": job_id},
            )
            raise ChannelError(str(e), getattr(e, "code", "refused")) from None
        self._within_quota(member, {"project": project, "kind": "weights", "job": job_id})
        fd = os.memfd_create("paitient-job-weights", 0)
        try:
            os.write(fd, data)
            sha, size = self.store.put_blob_from_fd(fd, self.settings.max_bytes)
            listing = self.store.put_blob(json.dumps(graph).encode())[0]  # the graph trained, for the steward
        except StoreError as e:
            raise ChannelError(str(e), "refused") from None
        finally:
            os.close(fd)
        req = self._file(
            member,
            {"project": project, "kind": "weights", "job": job_id, "sha256": sha, "size": size},
            project=project,
            username=member.username,
            account=member.account,
            uid=peer.uid,
            kind="weights",
            filename=f"{job_id}.safetensors",
            sha256=sha,
            size=size,
            justification=justification,
            meta={"job": job_id, "record": envelope, "graph_listing": listing},
        )
        self._queue.put(req.id)
        return {"id": req.id, "state": req.state, "project": project, "sha256": sha, "size": size}

    def _within_quota(self, member: Member, details: dict[str, Any]) -> None:
        """Refuse a request over the caller's [airlock] requests_per_day before its upload is read."""
        try:
            self.store.may_file(member.username, self.settings.requests_per_day)
        except TooManyRequests as e:
            raise self._over_quota(member, details, e) from None

    def _over_quota(self, member: Member, details: dict[str, Any], e: TooManyRequests) -> ChannelError:
        """The refusal of a request over the caller's quota, its audit record written."""
        self.emit(
            actor=member.username,
            action="airlock.request",
            object="",
            outcome="denied",
            details={"reason": str(e), "filed_in_24h": e.filed, **details},
        )
        return ChannelError(str(e), RATE_LIMITED)

    def _file(self, member: Member, details: dict[str, Any], **request: Any) -> Request:
        """File a request whose ``airlock.request`` audit record is written before the request is committed:
        when the audit trail cannot record it, nothing is filed and the researcher is told why. The caller's
        requests of the last 24 hours are counted again in the same transaction (:meth:`Store.create`)."""

        def record(rid: str) -> None:
            self.emit(actor=member.username, action="airlock.request", object=rid, details=details, required=True)

        try:
            return self.store.create(**request, before_commit=record, per_day=self.settings.requests_per_day)
        except TooManyRequests as e:
            raise self._over_quota(member, details, e) from None
        except (ChannelError, StoreError):
            raise
        except Exception:
            raise ChannelError(unrecordable("this request", "not filed"), "unavailable") from None

    def op_check(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Run a request's checks on a file without filing it: the feedback ``airlock.check`` shows before a request.

        Takes what ``request`` takes (one descriptor; kind, project, recipe, model, format; no justification needed)
        and validates the caller the same way. It re-encodes the file and runs the same checks with the same
        context, except that nothing is kept: no blob, no request, no count table for differencing, and the
        membership-inference audit of weights is not run (the answer says so). Bounded by size, time and
        concurrency (:mod:`paitient.services.airlock.feedback`). Recorded as ``airlock.check_preview`` with the
        file's hashes and the outcome, never its content.
        """
        member = self._caller(peer)
        filename = _clean_filename(args.get("filename"))

        def record(outcome: str, **details: Any) -> None:
            self.emit(
                actor=member.username,
                action="airlock.check_preview",
                object=str(details.get("sha256") or details.get("upload_sha256") or ""),
                outcome=outcome,
                details={
                    "project": self._named_project(args),
                    "kind": args.get("kind") if args.get("kind") in AIRLOCK_KINDS else None,
                    "filename": filename,
                    **details,
                },
            )

        try:
            kind, project, _, meta = self._validate_request(member, args, filing=False)
            _one_regular_file(fds)
            upload = _read_all(fds[0], min(self.settings.check_max_bytes, self.settings.max_bytes))
        except StoreError as e:
            record("denied", reason=str(e))
            raise ChannelError(
                f"{e} before a request; file the request instead: its checks run after it", TOO_LARGE
            ) from None
        except ChannelError as e:
            record("denied", reason=str(e))
            raise
        upload_sha = hashlib.sha256(upload).hexdigest()
        try:
            answer = self.feedback.run(
                member.username, lambda: self._check_preview(member, peer.uid, kind, project, filename, upload, meta)
            )
        except ChannelError as e:
            record(
                "error",
                reason=str(e),
                bound=e.code,
                project=project,
                kind=kind,
                upload_sha256=upload_sha,
                upload_size=len(upload),
            )
            raise
        record(
            "ok",
            project=project,
            kind=kind,
            sha256=answer["sha256"],
            upload_sha256=upload_sha,
            upload_size=len(upload),
            overall=answer["overall"],
            checks={c["check"]: c["status"] for c in answer["checks"]},
        )
        return answer

    def preview_context(self) -> CheckContext:
        """:meth:`check_context` for a check before a request: it keeps no count table (the differencing check
        still compares with the project's released and pending ones) and runs no membership-inference audit."""
        return dataclasses.replace(
            self.check_context(), stage_table=lambda _rid, _project, _table: None, membership_audit=False
        )

    def _release_form(self, kind: str, filename: str, upload: bytes, meta: dict[str, Any]) -> Output:
        """The upload's canonical form under the site's limits, as a request stores it and a check judges it;
        raises :class:`Refused`."""
        return canonical_output(
            kind,
            filename,
            upload,
            table_format=meta.get("format"),
            max_pages=self.settings.max_table_pages,
            max_side=self.settings.max_figure_side,
        )

    def _check_preview(
        self, member: Member, uid: int, kind: str, project: str, filename: str, upload: bytes, meta: dict[str, Any]
    ) -> dict[str, Any]:
        started = time.monotonic()
        upload_sha = hashlib.sha256(upload).hexdigest()
        sha: str | None = None
        size = 0
        released_as = filename
        try:
            out = self._release_form(kind, filename, upload, meta)
        except Refused as e:
            results = [result("canonical", "fail", f"the airlock would refuse this request: {e}")]
        else:
            sha, size, released_as = hashlib.sha256(out.data).hexdigest(), len(out.data), out.filename
            data, checked_name = out.data, out.filename
            if out.cells:  # an XLSX release is checked as the same cells in CSV, as checked_form does
                data, checked_name = out.cells, (out.filename.rpartition(".")[0] or out.filename) + ".csv"
            now = time.time()
            req = Request(
                id="check-before-request",
                project=project,
                username=member.username,
                account=member.account,
                uid=uid,
                kind=kind,
                filename=checked_name,
                sha256=sha,
                size=size,
                justification="",
                meta={
                    **meta,
                    "upload": {"sha256": upload_sha, "size": len(upload), "filename": filename},
                    "canonical": {"form": out.form, "dropped": list(out.dropped), "quoted": out.quoted},
                },
                state=review.CHECKING,
                created=now,
                updated=now,
            )
            try:
                results = self._with_upload(req, run_checks(req, data, self.preview_context()))
            except Exception as e:
                self.log.exception("a check before a request raised")
                results = [
                    result(
                        "internal",
                        "error",
                        "the automatic checks failed; a steward would review by hand",
                        error=f"{type(e).__name__}: {e}",
                    )
                ]
        min_count = self.settings.min_count
        checks = []
        for c in results:
            # As op_status gives a requester their checks: an error text may come from the model's own code.
            kept = {
                "check": c["check"],
                "status": c["status"],
                "reason": c["reason"],
                "details": {k: v for k, v in (c.get("details") or {}).items() if k != "error"},
            }
            checks.append({**kept, "fix": fix_for(kept, min_count=min_count), "shown": views.notebook_check(kept)})
        return {
            "project": project,
            "kind": kind,
            "filename": released_as,
            "sha256": sha,
            "size": size,
            "upload_sha256": upload_sha,
            "checks": checks,
            "overall": review.overall_status(c["status"] for c in checks),
            "skipped": [c["check"] for c in checks if c["details"].get("skipped")],
            "seconds": round(time.monotonic() - started, 4),
            "filed": False,
        }

    def _validate_request(
        self, member: Member, args: dict[str, Any], *, filing: bool = True
    ) -> tuple[str, str, str, dict[str, Any]]:
        """The request's kind, project, justification and what the checks read; ``filing=False`` (a check before a
        request): no justification is needed and ``supersedes`` is not looked at."""
        kind = args.get("kind")
        if kind not in AIRLOCK_KINDS:
            raise ChannelError(f"kind must be one of {', '.join(AIRLOCK_KINDS)}; got {kind!r}", BAD_REQUEST)
        justification = args.get("justification") if filing else ""
        if filing and (not isinstance(justification, str) or not justification.strip()):
            raise ChannelError("say why this output should leave the workspace: justification='...'", BAD_REQUEST)
        assert isinstance(justification, str)
        if len(justification) > MAX_JUSTIFICATION:
            raise ChannelError(f"the justification is longer than {MAX_JUSTIFICATION} characters", BAD_REQUEST)
        project = args.get("project")
        if project is None:
            if len(member.projects) != 1:
                raise ChannelError(
                    f"name the project: project= one of {', '.join(member.projects) or '(you are in no project)'}",
                    BAD_REQUEST,
                )
            project = member.projects[0]
        if project not in member.projects:
            raise ChannelError(
                f"you are not a member of project {project!r}; your projects: {', '.join(member.projects) or 'none'}",
                FORBIDDEN,
            )
        meta: dict[str, Any] = {}
        if args.get("recipe") is not None:
            if kind != "table" or not isinstance(args["recipe"], dict):
                raise ChannelError("a recipe (dict) goes with kind='table' only", BAD_REQUEST)
            meta["recipe"] = args["recipe"]
        if args.get("format") is not None:
            if kind != "table" or args["format"] not in TABLE_FORMATS:
                raise ChannelError(
                    f"format= goes with kind='table' only and is one of {', '.join(TABLE_FORMATS)}; "
                    f"got {args['format']!r} for kind={kind!r}",
                    BAD_REQUEST,
                )
            meta["format"] = args["format"]
        if args.get("model") is not None:
            model = args["model"]
            if kind != "weights" or not isinstance(model, dict):
                raise ChannelError("a model description (dict) goes with kind='weights' only", BAD_REQUEST)
            if len(str(model.get("source", ""))) > MAX_MODEL_SOURCE:
                raise ChannelError(f"the model source is longer than {MAX_MODEL_SOURCE} characters", BAD_REQUEST)
            meta["model"] = model
        if filing and args.get("supersedes"):
            try:
                earlier = self.store.get(str(args["supersedes"]))
            except StoreError:
                earlier = None
            if earlier is None or earlier.username != member.username:
                raise ChannelError(f"supersedes: {args['supersedes']!r} is not one of your requests", BAD_REQUEST)
            meta["supersedes"] = earlier.id
        return kind, project, justification.strip(), meta

    def op_status(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> Any:
        member = self._caller(peer)
        rid = args.get("id")
        if rid:
            try:
                req = self.store.get(str(rid))
            except StoreError as e:
                raise ChannelError(str(e), NOT_FOUND) from None
            if req.username != member.username:
                raise ChannelError(f"request {rid} is not yours", FORBIDDEN)
            return self.describe(req, for_steward=False)
        return [self.describe(r, for_steward=False) for r in self.store.list(username=member.username)]

    def describe(self, req: Request, *, for_steward: bool) -> dict[str, Any]:
        """A request with its check results and decisions (error texts of checks for stewards only)."""
        checks = self.store.checks(req.id)
        if not for_steward:
            # An error text may come from the researcher's own model code run in the audit sandbox: only
            # stewards see it, so it cannot serve as a channel out of the workspace.
            checks = [
                {
                    **{k: c[k] for k in ("check", "status", "reason")},
                    "details": {k: v for k, v in (c.get("details") or {}).items() if k != "error"},
                }
                for c in checks
            ]
        decisions = [{"by": e.actor, "ts": e.ts, **e.data} for e in self.store.events(req.id, "decision")]
        return {
            **req.public(),
            "checks": checks,
            "decisions": decisions,
            "overall": review.overall_status(c["status"] for c in checks) if checks else None,
        }

    # ------------------------------------------------------------------------------------------------
    # Checks

    def start(self) -> None:
        """Start the check worker and re-queue everything a restart interrupted."""
        prepare_work_root(self.audit_work_root)
        self._worker = threading.Thread(target=self._work, name="airlock-checks", daemon=True)
        self._worker.start()
        for req in reversed(self.store.list(states_=[review.SUBMITTED, review.CHECKING])):
            self._queue.put(req.id)

    def stop(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=30)

    def wait_idle(self) -> None:
        self._queue.join()

    def checks_queued(self) -> int:
        """Requests waiting for the check worker (the one being checked included until it is done)."""
        return self._queue.unfinished_tasks

    def _work(self) -> None:
        while True:
            try:
                rid = self._queue.get(timeout=BACKLOG_RETRY)
            except queue.Empty:
                if self.backlog.waiting:
                    self.backlog.flush()
                continue
            try:
                if rid is None:
                    return
                self.check(rid)
            except Exception:
                self.log.exception("checking airlock request %s failed", rid)
            finally:
                self._queue.task_done()

    def check(self, rid: str) -> None:
        req = self.store.get(rid)
        if req.state not in (review.SUBMITTED, review.CHECKING):
            return
        restarted = req.state == review.CHECKING
        req = self.store.transition(rid, review.CHECKING, actor="airlock", data={"rerun": restarted})
        try:
            checked, data = self.checked_form(req)
            results = self._with_upload(req, run_checks(checked, data, self.check_context()))
        except Exception as e:
            self.log.exception("checks of %s raised", rid)
            results = [
                {
                    "check": "internal",
                    "status": "error",
                    "reason": "the automatic checks failed; a steward reviews by hand",
                    "details": {"error": f"{type(e).__name__}: {e}"},
                }
            ]
        self.store.record_checks(rid, results)
        overall = review.overall_status(r["status"] for r in results)
        self.emit(
            actor="airlock",
            action="airlock.check",
            object=rid,
            outcome="ok",
            details={
                "project": req.project,
                "user": req.username,
                "kind": req.kind,
                "overall": overall,
                "checks": {r["check"]: r["status"] for r in results},
            },
        )
        project = self.site.project(req.project)
        recipe = next((r for r in results if r["check"] == "recipe" and r["status"] == "pass"), None)
        automatic = (recipe or {}).get("details", {}).get("automatic")
        certified = next((r for r in results if r["check"] == "certified" and r["status"] == "pass"), None)
        steps = ((certified or {}).get("details", {}).get("record") or {}).get("preprocessing") or []
        not_automatic = review.auto_release_refusal(
            req.kind,
            project.auto_release,
            [r["status"] for r in results],
            certified=certified is not None and bool(req.meta.get("job")),
            recomputed=automatic if isinstance(automatic, str) else automatic is True,
            own_constants=any(s.get("from") != "catalogue" for s in steps),
            approved_graph=self._graph_approved(req),
        )
        if not_automatic is None:
            not_automatic = self._over_automatic_quota(req, project.auto_release_per_day)
        released: tuple[ReleasedFile, list[bytes]] | None = None
        if not_automatic is None and req.kind == "table":
            try:
                released = self._computed_release(req, (recipe or {}).get("details", {}).get("version"))
            except _Unreleasable as e:
                not_automatic = str(e)
            except Exception as e:
                self.log.exception("the table of %s could not be computed for release", rid)
                not_automatic = (
                    f"the airlock could not compute the table itself ({type(e).__name__}); a steward reviews it"
                )
        moved: dict[str, Any] = {"overall": overall}
        if not_automatic and req.kind in project.auto_release:
            moved["not_automatic"] = not_automatic
        self.store.transition(rid, review.IN_REVIEW, actor="airlock", data=moved)
        if not_automatic is None:
            decision = {"project": req.project, "user": req.username, "action": "approve", "automatic": True}
            if released is not None:
                decision.update(sha256=released[0].sha256, size=released[0].size, submitted_sha256=req.sha256)
            try:  # recorded first: without its audit record the output waits for a steward instead
                self.emit(actor="airlock", action="airlock.decision", object=rid, required=True, details=decision)
            except Exception:
                self.log.error("automatic release of %s skipped: the audit trail cannot record it", rid)
                return
            release: dict[str, Any] = {
                "automatic": True,
                "reason": f"every automatic check passed and project "
                f"{req.project} releases {req.kind} outputs automatically",
            }
            file = None
            if released is not None:
                release["reason"] += "; the file released is the airlock's own computation of the table's recipe"
                file, blobs = released
                for blob in blobs:  # stored once the release is recorded: nothing is kept for one that is not
                    self.store.put_blob(blob)
            self.store.transition(rid, review.RELEASED, actor="airlock", data=release, file=file)

    def _graph_approved(self, req: Request) -> bool:
        """The graph of ``req``'s certified weights is approved for automatic release: listed in the site file,
        or by as many of the project's stewards as a release needs, since the last revocation."""
        standing = self.graph_standing(req)
        return standing is not None and standing.approved

    def _over_automatic_quota(self, req: Request, per_day: int) -> str | None:
        """Why ``req`` waits for a steward although it could leave automatically: its requester had
        ``per_day`` outputs of the project released without review in the last 24 hours (the project's
        ``auto_release_per_day``). Counted by the one check worker, which alone releases automatically."""
        if per_day == 0:
            return f"project {req.project} releases nothing without review (auto_release_per_day = 0)"
        done = self.store.automatic_releases(req.username, req.project, time.time() - DAY)
        if len(done) < per_day:
            return None
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(done[-per_day] + DAY + 60))
        return (
            f"{req.username} had {len(done)} outputs of project {req.project} released without review in the last "
            f"24 hours, as many as the project allows (auto_release_per_day = {per_day}): a steward reviews this "
            f"one; outputs leave without review again from {when}"
        )

    def _computed_release(self, req: Request, version: Any) -> tuple[ReleasedFile, list[bytes]]:
        """The file a table released without a steward leaves as, and the blobs to store for it: the airlock's
        own computation of its recipe (:func:`paitient.services.airlock.checks.computed_table`), named after
        the request, in the format asked. Nothing of the kernel's file leaves: not its labels, its layout, its
        extra columns or its name."""
        recipe = disclosure.validate_recipe(req.meta.get("recipe"))
        if version is not None:  # the version the checks read (the recipe's, or where `current` pointed then)
            recipe = {**recipe, "version": version}
        source = self._load_dataset(req.project, recipe["dataset"], recipe.get("version"))
        table = computed_table(source, recipe)
        # The checks count what pandas' crosstab and ACRO count, which can leave out a missing category's
        # cell; the airlock's own table keeps it, so what leaves is checked again, cell by cell.
        small = int((table.iloc[:, -1] < self.settings.min_count).sum())  # the counts: the last column
        if small:
            raise _Unreleasable(
                f"the table the airlock computed for release has {small} cell(s) under the minimum count "
                f"({self.settings.min_count}) that the checks did not count (a missing value's group): a steward "
                "reviews it"
            )
        fmt = req.meta.get("format") or "csv"
        out = canonical_output("table", f"{req.id}.csv", frame_csv(table), table_format=fmt)
        canonical: dict[str, Any] = {"form": out.form, "dropped": [], "computed": True}
        blobs = [out.data]
        if out.cells:
            canonical["cells_sha256"] = hashlib.sha256(out.cells).hexdigest()
            blobs.append(out.cells)
        file = ReleasedFile(
            filename=out.filename,
            sha256=hashlib.sha256(out.data).hexdigest(),
            size=len(out.data),
            meta={**req.meta, "canonical": canonical},
        )
        return file, blobs

    def checked_form(self, req: Request) -> tuple[Request, bytes]:
        """What the checks and the preview read of ``req``: its stored file, or for a table released as XLSX the
        same cells as canonical CSV (stored with it)."""
        cells = (req.meta.get("canonical") or {}).get("cells_sha256")
        if cells:
            name = req.filename.rpartition(".")[0] or req.filename
            return dataclasses.replace(req, filename=name + ".csv"), self.store.read_blob(cells)
        return req, self.store.read_blob(req.sha256)

    def _with_upload(self, req: Request, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The checks of the stored form, with what only the upload can tell: whether it was byte-for-byte a
        published dataset file, and what its canonical re-encoding left out."""
        upload = req.meta.get("upload") or {}
        form = req.meta.get("canonical") or {}
        if not upload or not form:
            return results  # a training job's weights, or a request taken before canonical outputs
        copy = published.check_not_published(str(upload.get("sha256")), self.published.files())
        if copy["status"] == "fail":
            results = [copy if r["check"] == "published_copy" else r for r in results]
        dropped = list(form.get("dropped") or [])
        what = {
            "csv": "a CSV re-written from the parsed cells",
            "xlsx": "an XLSX written from the parsed cells",
            "png": "a PNG of the image's pixels",
            "text": "normalised UTF-8 text",
            "safetensors": "the tensors re-serialised by safetensors, without metadata",
        }.get(str(form.get("form")), str(form.get("form")))
        reason = f"stored and released as {what}; the upload's own bytes are not kept"
        if dropped:
            reason += f"; left out: {'; '.join(dropped)}"
        quoted = int(form.get("quoted") or 0)
        if quoted:
            reason += (
                f"; {quoted} text cell(s) or column name(s) that a spreadsheet would run as a formula (starting "
                "with =, +, -, @, a tab or a line break) begin with a single quote (') in the file, so they stay "
                "text; the checks read them without it"
            )
        return [
            *results,
            result(
                "canonical",
                "pass",
                reason,
                form=form.get("form"),
                dropped=dropped,
                quoted=quoted,
                upload_sha256=upload.get("sha256"),
                upload_size=upload.get("size"),
            ),
        ]

    # ------------------------------------------------------------------------------------------------
    # Web side: who may see, decide and download what

    def member(self, username: str) -> Member | None:
        return self.registry.by_username(username)

    def steward_projects(self, username: str, scopes: set[str]) -> list[str]:
        if SCOPE_REVIEW not in scopes:
            return []
        return [p.name for p in self.site.projects if username in p.stewards]

    def member_projects(self, username: str) -> list[str]:
        m = self.member(username)
        return list(m.projects) if m else []

    def reviewer_projects(self, username: str, scopes: set[str]) -> list[str]:
        """Projects whose requests ``username`` reviews with the review scope: those naming them a steward, and
        every project for an admin. Reviewers see previews; only stewards decide (:meth:`may_review`)."""
        if SCOPE_REVIEW not in scopes:
            return []
        member = self.member(username)
        if member is not None and "admin" in member.roles:
            return [p.name for p in self.site.projects]
        return self.steward_projects(username, scopes)

    def may_review(self, username: str, scopes: set[str], req: Request) -> bool:
        """May ``username`` decide on ``req``: a steward of its project."""
        return req.project in self.steward_projects(username, scopes)

    def may_download(self, username: str, scopes: set[str], req: Request) -> bool:
        return (
            req.state == review.RELEASED
            and SCOPE_DOWNLOAD in scopes
            and (username == req.username or req.project in self.member_projects(username))
        )

    def may_view(self, username: str, scopes: set[str], req: Request) -> bool:
        return (
            (username == req.username and SCOPE_REQUEST in scopes)
            or self.may_preview(username, scopes, req)
            or self.may_download(username, scopes, req)
        )

    def may_preview(self, username: str, scopes: set[str], req: Request) -> bool:
        """Previews (and the upload's details) are for the project's reviewers only, never its requester's
        browser: a requester who is also a steward of the project sees no preview of their own request."""
        return req.project in self.reviewer_projects(username, scopes) and username != req.username

    def visible(self, username: str, scopes: set[str]) -> list[Request]:
        reviewable = self.reviewer_projects(username, scopes)
        reqs = (
            self.store.list(projects=reviewable, username=username if SCOPE_REQUEST in scopes else None)
            if (reviewable or SCOPE_REQUEST in scopes)
            else []
        )
        seen = {r.id for r in reqs}
        if SCOPE_DOWNLOAD in scopes:
            for r in self.store.list(projects=self.member_projects(username), states_=[review.RELEASED]):
                if r.id not in seen:
                    reqs.append(r)
        return sorted(reqs, key=lambda r: r.created, reverse=True)

    def decide(
        self,
        rid: str,
        *,
        username: str,
        scopes: set[str],
        action: str,
        comment: str,
        override: str = "",
        confirm_override: bool = False,
    ) -> review.Decision:
        req = self.store.get(rid)
        try:
            may_review = self.may_review(username, scopes, req)
            if may_review and action == "approve" and username != req.username:  # one's own is refused below
                self._read_whole(req, username)
            try:
                needed = self.approvals_needed(req)
            except review.TransitionError:
                if may_review and action == "approve":
                    raise
                needed = self.site.project(req.project).approvals  # a refusal or return stays possible
            decision = self.store.decide(
                rid,
                reviewer=username,
                action=action,
                comment=comment,
                may_review=may_review,
                approvals_needed=needed,
                override=override,
                confirm_override=confirm_override,
                before_commit=lambda d: self._record_decision(req, username, action, comment, d),
            )
        except review.TransitionError as e:
            self._denied("airlock.decision", req, username, action, e)
            raise
        return decision

    def _denied(self, record: str, req: Request, username: str, action: str, why: Exception) -> None:
        """The audit record of a steward's act on ``req`` that was refused, with the reason."""
        self.emit(
            actor=username,
            action=record,
            object=req.id,
            outcome="denied",
            details={"project": req.project, "user": req.username, "action": action, "reason": str(why)},
        )

    def _read_whole(self, req: Request, username: str) -> None:
        """Refuse an approval of a table of several preview pages that ``username`` has not all opened: what
        is approved leaves whole, so it is read whole (the checks read every cell, but rows of values moved
        off the data are no patient rows to them)."""
        try:
            table, unread = self.previews.unread(req, username)
        except NoPreview as e:
            if req.kind not in ("table", "other"):
                return  # weights are reviewed from their checks and record, a figure from its pixels
            raise review.TransitionError(
                f"no reviewer can read this output ({e}), and what is approved leaves whole: return the request "
                "for a smaller one",
                409,
            ) from None
        if table is None or not unread:
            return
        shown = "; ".join(p.describe(table.total_rows, table.total_columns) for p in unread[:5])
        more = f" and {len(unread) - 5} more" if len(unread) > 5 else ""
        raise review.TransitionError(
            f"the table has {table.total_rows} rows and {table.total_columns} columns, {len(table.pages)} pages of "
            f"preview, and you have not opened {len(unread)} of them ({shown}{more}): what you approve leaves "
            "whole, so read every page first (the page links are under the preview), or return the request "
            "for a shorter table",
            409,
        )

    def _record_decision(
        self, req: Request, username: str, action: str, comment: str, decision: review.Decision
    ) -> None:
        """The decision's audit record, written before the decision is committed (none without it)."""
        try:
            self.emit(
                actor=username,
                action="airlock.decision",
                object=req.id,
                required=True,
                details={
                    "project": req.project,
                    "user": req.username,
                    "action": action,
                    "comment": comment.strip(),
                    "approvals": decision.approvals,
                    "needed": decision.needed,
                    "state": decision.new_state or review.IN_REVIEW,
                    **({"override": decision.override} if decision.override else {}),
                    **({"confirms_override": decision.confirms} if decision.confirms else {}),
                },
            )
        except Exception:
            raise review.TransitionError(unrecordable("this decision", "not taken"), 503) from None

    def certified_graph(self, req: Request) -> str | None:
        """The SHA-256 of the graph a training runner signed that ``req``'s weights were trained from (its
        ``certified`` check passed), or None."""
        if req.kind != "weights" or not req.meta.get("job"):
            return None
        for c in self.store.checks(req.id):
            if c["check"] == "certified" and c["status"] == "pass":
                sha = ((c.get("details") or {}).get("record") or {}).get("graph_sha256")
                return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None
        return None

    def graph_standing(self, req: Request) -> GraphStanding | None:
        """Whether the graph of ``req``'s certified weights is approved for automatic release in its project,
        and by whom; None for a request of no certified graph."""
        sha = self.certified_graph(req)
        if sha is None:
            return None
        project = self.site.project(req.project)
        # an approval counts while its steward is one of the project's: a steward removed takes theirs along
        in_force = tuple(a for a in self.store.graph_approvals(req.project, sha) if a.actor in project.stewards)
        return GraphStanding(
            sha256=sha,
            in_site=sha in project.auto_release_graphs,
            # a steward's approval counts for colleagues' requests only: for their own, others approve
            approvals=tuple(a for a in in_force if a.actor != req.username),
            needed=project.approvals,
            in_force=in_force,
        )

    def graph_read(self, req: Request, username: str) -> None:
        """That steward ``username`` was shown the listing of ``req``'s graph (on the request's page): kept
        with the request's history, and in the audit trail as a preview of it."""
        self.store.record_preview(req.id, actor=username, data={"sha256": req.sha256, "graph": True})
        self.emit(
            actor=username,
            action="airlock.preview",
            object=req.id,
            details={"project": req.project, "user": req.username, "via": "graph", "file_sha256": req.sha256},
        )

    def decide_graph(self, rid: str, *, username: str, scopes: set[str], action: str, reason: str) -> GraphStanding:
        """A steward approves the graph of request ``rid``'s certified weights for automatic release in its
        project (``approve``), or takes that back (``revoke``). An approval needs a written reason, a steward
        who is not the requester and has opened the request's page (where the graph is listed), and counts
        once the project's ``approvals`` stewards gave theirs; one revocation ends it. Recorded in the audit
        trail first (none without its record) and kept with the request's history; the project's
        ``auto_release_graphs`` in the site file stands beside it and is changed there only."""
        req = self.store.get(rid)
        try:
            standing = self._graph_decision_allowed(req, username, scopes, action, reason.strip())
            data = {"action": action, "graph_sha256": standing.sha256, "reason": reason.strip()}

            def record() -> None:
                try:
                    self.emit(
                        actor=username,
                        action="airlock.graph",
                        object=rid,
                        required=True,
                        details={"project": req.project, "user": req.username, **data},
                    )
                except Exception:
                    raise review.TransitionError(unrecordable("this", "not taken"), 503) from None

            self.store.graph_event(rid, actor=username, data=data, before_commit=record)
        except review.TransitionError as e:
            self._denied("airlock.graph", req, username, action, e)
            raise
        done = self.graph_standing(req)
        assert done is not None
        return done

    def _graph_decision_allowed(
        self, req: Request, username: str, scopes: set[str], action: str, reason: str
    ) -> GraphStanding:
        if action not in ("approve", "revoke"):
            raise review.TransitionError("action must be approve or revoke", 400)
        if not self.may_review(username, scopes, req):
            raise review.TransitionError(f"only the stewards of project {req.project} approve its graphs", 403)
        standing = self.graph_standing(req)
        if standing is None:
            raise review.TransitionError(
                "this request holds no weights a training runner certified: only the graph of certified weights "
                "can be approved for automatic release",
                409,
            )
        if action == "revoke":
            if not standing.in_force:
                raise review.TransitionError(
                    "no steward has approved this graph for automatic release"
                    + (
                        "; it is listed in the site file's auto_release_graphs, which the operator changes"
                        if standing.in_site
                        else ""
                    ),
                    409,
                )
            return standing
        if username == req.username:
            raise review.TransitionError("you filed this request: another steward approves its graph", 403)
        if len(reason) < review.MIN_OVERRIDE:
            raise review.TransitionError(
                f"say why weights of this graph may leave without review (at least {review.MIN_OVERRIDE} "
                "characters): what you read of its numbers and structure",
                400,
            )
        if any(a.actor == username for a in standing.approvals):
            raise review.TransitionError("you approved this graph already: another steward gives the next", 409)
        if not self.store.read_graph(req.id, username, req.sha256):
            raise review.TransitionError(
                "open the request's page and read the graph first: an approval covers every later job of it", 409
            )
        return standing

    def download(
        self, rid: str, *, username: str, scopes: set[str], client: str = "", part: str = "file"
    ) -> tuple[Request, bytes]:
        """The released file for ``username`` (``part="record"``: the signed training record of released
        certified weights, for checking them offline); raises PermissionError (recorded) if they may not have
        it, LookupError if the request has no such part."""
        req = self.store.get(rid)
        if part == "record" and not req.meta.get("job"):
            raise LookupError(f"request {rid} holds no signed training record: only a training job's weights do")
        if not self.may_download(username, scopes, req):
            reason = (
                f"request {rid} is {req.state}, not released"
                if req.state != review.RELEASED
                else f"only the requester and members of project {req.project} download its released outputs"
            )
            self.emit(
                actor=username,
                action="airlock.download",
                object=rid,
                outcome="denied",
                details={"project": req.project, "reason": reason},
            )
            raise PermissionError(reason)
        if part == "record":
            data = (json.dumps(req.meta["record"], indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()
            sha = hashlib.sha256(data).hexdigest()
        else:
            data, sha = self.store.read_blob(req.sha256), req.sha256
        # Recorded first, in the airlock's own events and the audit trail: no record, no download.
        self.store.record_download(rid, actor=username, data={"client": client, "sha256": sha, "part": part})
        self.emit(
            actor=username,
            action="airlock.download",
            object=rid,
            required=True,
            details={"project": req.project, "sha256": sha, "size": len(data), "client": client, "part": part},
        )
        return req, data

    # ------------------------------------------------------------------------------------------------
    # What reaches a browser: a request's description (previews: :attr:`previews`)

    def describe_for_reviewer(self, req: Request, username: str) -> dict[str, Any]:
        """:meth:`describe` for a reviewer's browser: whole, but for the differences the differencing check
        found with tables ``username`` filed. Their kernel chose those tables' numbers, and a difference
        with a colleague's table, whose cells the page shows, gives them back (the side-by-side view leaves
        those tables out for the same reason); another steward reads them."""
        info = self.describe(req, for_steward=True)
        checks = []
        for check in info["checks"]:
            details = check.get("details") or {}
            own = {rid for rid in details.get("earlier", []) if self._filed_by(str(rid)) == username}
            if check["check"] == "differencing" and own:
                kept = [f for f in details.get("findings", []) if not own & set(f.get("earlier", []))]
                left = len(details.get("findings", [])) - len(kept)
                check = {
                    **check,
                    "details": {
                        **details,
                        "findings": kept,
                        "earlier": [rid for rid in details["earlier"] if rid not in own],
                        "own": sorted(own),
                        "left_out": f"{left} difference(s) with tables you filed; another steward reads them",
                    },
                }
            checks.append(check)
        return {**info, "checks": checks}

    def _filed_by(self, rid: str) -> str | None:
        try:
            return self.store.get(rid).username
        except StoreError:
            return None

    def describe_for(self, req: Request, *, username: str, scopes: set[str]) -> dict[str, Any]:
        """:meth:`describe` as ``username``'s browser may get it: whole for the project's reviewers, once their
        read is in the audit trail (as a page's preview), without any of the upload's content for everyone else
        (:func:`paitient.services.airlock.views.requester_info`), and for a reviewer while the trail takes no
        record, with ``unrecorded`` saying why."""
        if self.may_preview(username, scopes, req):
            try:
                self.previews.record_details_read(req, username=username)
            except PreviewUnrecorded as e:
                return {**self.describe_for_requester(req), "unrecorded": str(e)}
            return self.describe_for_reviewer(req, username)
        return self.describe_for_requester(req)

    def describe_for_requester(self, req: Request) -> dict[str, Any]:
        """:meth:`describe` without any of the upload's content, as every browser but a reviewer's gets it."""
        return views.requester_info(self.describe(req, for_steward=False))


def _read_all(fd: int, max_bytes: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise StoreError(f"the file has {size} bytes; the airlock takes at most {max_bytes}")
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
        if offset > max_bytes:
            raise StoreError(f"the file is larger than {max_bytes} bytes")


class _Unreleasable(Exception):
    """The airlock's own table of a recipe may not leave without a steward; the message says why."""


def _one_regular_file(fds: list[int]) -> None:
    """The request's one descriptor must be a regular file opened for reading."""
    if len(fds) != 1:
        raise ChannelError("send the file as exactly one open file descriptor", BAD_REQUEST)
    try:
        readable = stat.S_ISREG(os.fstat(fds[0]).st_mode) and os.pread(fds[0], 0, 0) == b""
    except OSError:
        readable = False
    if not readable:
        raise ChannelError(
            "send a regular file opened for reading (not a directory, pipe, socket or a path-only descriptor)",
            BAD_REQUEST,
        )
