"""`paitient audit show`: filters, terminal-safe output, clear errors."""

import datetime as dt
import json
import subprocess
import sys

import pytest

from paitient.services.audit import emit
from paitient.services.audit.query import Filter, FilterError, matches, parse_time, printable


def show(site, *args):
    return subprocess.run(
        [sys.executable, "-m", "paitient.cli", "audit", "show", f"--state-dir={site.state_dir}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def events(site):
    emit(site, actor="alice", action="kernel.start", object="k1", details={"datasets": ["demo/heart", "demo/diab"]})
    emit(site, actor="alice", action="cell.execute", object="k1", details={"code": "print('\x1b[2J')"})
    emit(
        site,
        actor="bob",
        action="airlock.decision",
        object="req-7",
        outcome="denied",
        details={"project": "heart", "user": "alice"},
    )
    emit(site, actor="bob", action="ledger.reserve", object="heart/whas", details={"epsilon": 0.5})


def actions(out):
    return [json.loads(line)["action"] for line in out.stdout.splitlines()]


def test_show_filters_by_user_project_action(site, events):
    assert actions(show(site, "--json", "--user=alice")) == ["kernel.start", "cell.execute", "airlock.decision"]
    assert actions(show(site, "--json", "--project=demo")) == ["kernel.start"]
    assert actions(show(site, "--json", "--project=heart")) == ["airlock.decision", "ledger.reserve"]
    assert actions(show(site, "--json", "--action=*.decision")) == ["airlock.decision"]
    assert actions(show(site, "--json", "--outcome=denied")) == ["airlock.decision"]
    assert actions(show(site, "--json", "--limit=2")) == ["airlock.decision", "ledger.reserve"]
    assert actions(show(site, "--json", "--since=1h", "--action=ledger")) == ["ledger.reserve"]
    assert actions(show(site, "--json", "--until=2001-01-01")) == []


def test_show_text_output_cannot_drive_the_terminal(site, events):
    emit(site, actor="mallory\x1b]0;owned\x07", action="kernel.stop", object="k\u202e9")
    out = show(site, "--action=cell.execute")
    assert out.returncode == 0
    assert "\x1b" not in out.stdout and "\\u001b[2J" in out.stdout  # JSON-escaped in details
    assert out.stdout.count("\n") == 1 and "  alice  cell.execute  k1  ok  " in out.stdout
    out = show(site, "--action=kernel.stop")
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\u202e" not in out.stdout
    assert "  mallory\\x1b]0;owned\\x07  kernel.stop  k\\u202e9  ok" in out.stdout


def test_an_object_cannot_forge_a_line_of_its_own(site, events):
    """Attack (a kernel's record): an object with a newline and, after it, what reads as a steward's approval
    of another user's request. ``audit show`` printed it as two records; now each record is one line, the
    newline and tab shown escaped."""
    forged = "oncology/kernel-1\n2026-12-07T20:50:00.000000Z  17  bob  airlock.decision\toncology/req-42"
    emit(site, actor="alice", action="kernel.start", object=forged, details={"decision": "approved"})
    out = show(site, "--action=kernel.start", "--limit=1")
    assert out.returncode == 0 and out.stdout.count("\n") == 1, out.stdout
    assert "  alice  kernel.start  oncology/kernel-1\\x0a2026-12-07T20:50:00.000000Z  17  bob  airlock.decision" in (
        out.stdout
    )
    assert "\\x09oncology/req-42  ok  " in out.stdout and "\t" not in out.stdout


def test_show_rejects_bad_time_with_what_to_use(site, events):
    out = show(site, "--since=last tuesday")
    assert out.returncode == 2 and "use e.g. 2026-11-28, 2026-11-28T17:00Z, 24h or 7d" in out.stderr


def test_audit_without_a_subcommand_says_what_to_run():
    out = subprocess.run([sys.executable, "-m", "paitient.cli", "audit"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert "paitient audit: name what to do: paitient audit verify | paitient audit show" in out.stderr


def test_show_without_a_trail_says_where_it_looked(world_tmp):
    out = subprocess.run(
        [sys.executable, "-m", "paitient.cli", "audit", "show", f"--state-dir={world_tmp}/none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and f"no audit trail at {world_tmp}/none/audit" in out.stderr


def test_non_root_cannot_read_the_trail(site, events):
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "paitient.cli",
            "audit",
            "verify",
            f"--trail={site.state_dir}/audit",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "readable by root only; run as root" in out.stderr


def test_time_parsing_and_matching_are_pure():
    now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    assert parse_time("24h", now=now) == "2026-11-27T12:00:00.000000Z"
    assert parse_time("2026-11-28T13:00+01:00") == "2026-11-28T12:00:00.000000Z"
    assert parse_time("2026-11-28") == "2026-11-28T00:00:00.000000Z"
    with pytest.raises(FilterError):
        parse_time("soon")
    rec = {
        "time": "2026-11-28T10:00:00.000000Z",
        "actor": "a",
        "action": "airlock.download",
        "object": "p1/x",
        "outcome": "ok",
        "details": {},
    }
    assert matches(rec, Filter.parse(project="p1", action="airlock", until="2026-11-28T11:00Z"))
    assert not matches(rec, Filter.parse(action="air"))  # a family is a whole dotted prefix
    assert not matches(rec, Filter.parse(since="2026-11-28T11:00Z"))
    assert printable("a\u202eb\x07") == "a\\u202eb\\x07"
