"""``paitient audit verify`` and ``paitient audit show``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from traitlets import Bool, Integer, Unicode

from paitient.app import CommandGroup, PaitientCommand
from paitient.services.audit import trail_dir
from paitient.services.audit.query import Filter, FilterError, printable, select
from paitient.services.audit.verify import verify_dir

_aliases = {**PaitientCommand.aliases, "trail": "AuditBase.trail"}


class AuditBase(PaitientCommand):
    trail = Unicode(
        "",
        help="Trail directory to read. Empty: <state_dir>/audit of the site configuration "
        "(give a copy's directory to check an archived trail).",
    ).tag(config=True)

    aliases = _aliases

    def directory(self) -> Path:
        return Path(self.trail) if self.trail else trail_dir(self.load_site())


class AuditVerify(AuditBase):
    name = "audit verify"
    description = (
        "Check the whole hash chain of the audit trail. Names the first bad record (file, line, seq, "
        "what is wrong); exits 1 if the chain is broken, 0 if it is intact."
    )
    json_output = Bool(False, help="Print the report as JSON.").tag(config=True)
    flags = {"json": ({"AuditVerify": {"json_output": True}}, "Print the report as JSON.")}

    def start(self) -> None:
        directory = self.directory()
        try:
            report = verify_dir(directory)
        except FileNotFoundError as e:
            self.fail(f"{e}; pass --trail=DIR or the --state-dir the workspace runs with")
        except PermissionError:
            self.fail(f"cannot read {directory}: the trail is readable by root only; run as root")
        if self.json_output:
            print(
                json.dumps(
                    {
                        "ok": report.ok,
                        "records": report.records,
                        "files": report.files,
                        "last_seq": report.last_seq,
                        "last_hash": report.last_hash,
                        "problems": [f.__dict__ for f in report.problems],
                        "notes": [f.__dict__ for f in report.notes],
                    },
                    indent=2,
                )
            )
        else:
            for note in report.notes:
                print(f"note: {printable(str(note))}")
            if report.ok:
                print(
                    f"audit trail intact: {report.records} records in {report.files} file(s), "
                    f"last seq {report.last_seq}, last hash {report.last_hash}"
                )
            else:
                first = report.first_problem
                print(f"audit trail BROKEN at {printable(str(first))}", file=sys.stderr)
                for more in report.problems[1:]:
                    print(f"  also: {printable(str(more))}", file=sys.stderr)
        self.exit(0 if report.ok else 1)


class AuditShow(AuditBase):
    name = "audit show"
    description = "Show audit records, oldest first, filtered by user, project, action and time."
    user = Unicode("", help="Only records by (or about) this username.").tag(config=True)
    project = Unicode("", help="Only records that concern this project.").tag(config=True)
    action = Unicode("", help="Only this action (cell.execute), family (airlock) or glob (*.stop).").tag(config=True)
    outcome = Unicode("", help="Only this outcome: ok, denied or error.").tag(config=True)
    since = Unicode("", help="From this time: 2026-11-28, 2026-11-28T17:00Z, or back from now: 24h, 7d.").tag(
        config=True
    )
    until = Unicode("", help="Up to this time (same forms as --since).").tag(config=True)
    limit = Integer(100, help="Show at most the newest N matching records (0: all).").tag(config=True)
    json_output = Bool(False, help="Print records as JSON lines (unchanged, with hashes).").tag(config=True)

    aliases = {
        **_aliases,
        **{k: f"AuditShow.{k}" for k in ("user", "project", "action", "outcome", "since", "until", "limit")},
    }
    flags = {"json": ({"AuditShow": {"json_output": True}}, "Print records as JSON lines.")}

    def start(self) -> None:
        directory = self.directory()
        try:
            flt = Filter.parse(
                user=self.user,
                project=self.project,
                action=self.action,
                since=self.since,
                until=self.until,
                outcome=self.outcome,
            )
        except FilterError as e:
            self.fail(str(e))
        if not directory.is_dir():
            self.fail(f"no audit trail at {directory}; pass --trail=DIR or the workspace's --state-dir")
        try:
            records = select(directory, flt, limit=self.limit or sys.maxsize)
        except PermissionError:
            self.fail(f"cannot read {directory}: the trail is readable by root only; run as root")
        for rec in reversed(records):
            if self.json_output:
                print(json.dumps(rec))
            else:
                print(format_line(rec))


def format_line(rec: dict) -> str:
    details = json.dumps(rec.get("details", {}), sort_keys=True, ensure_ascii=False)
    if len(details) > 300:
        details = details[:300] + "..."
    fields = [rec["time"], str(rec["seq"]), rec["actor"], rec["action"], rec["object"] or "-", rec["outcome"], details]
    return printable("  ".join(fields))


class AuditCommand(CommandGroup):
    name = "audit"
    description = "Verify the audit trail or show its records: paitient audit {verify,show} --help"
    commands = {"verify": AuditVerify, "show": AuditShow}
