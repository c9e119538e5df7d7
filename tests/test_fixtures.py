"""The shared fixtures do what they promise: accounts are real, private and removed."""

import os
import pwd
import subprocess


def test_make_system_user_creates_a_private_real_account(make_system_user):
    a = make_system_user("a")
    b = make_system_user("b")
    assert a.pw_uid != b.pw_uid and a.pw_uid != 0
    assert os.stat(a.pw_dir).st_uid == a.pw_uid
    # b cannot read a's home
    r = subprocess.run(
        ["setpriv", f"--reuid={b.pw_uid}", f"--regid={b.pw_gid}", "--clear-groups", "ls", a.pw_dir],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert pwd.getpwnam(a.pw_name).pw_dir == a.pw_dir


def test_a_failed_tests_report_carries_the_notable_lines_and_the_end_of_each_running_servers_log(tmp_path):
    from tests import logtails

    log = tmp_path / "server.log"
    lines = [f"[I 10:00 x] line {i}" for i in range(200)]
    lines[20] = "[E 10:00 gate] Withholding a message from kernel k: the gate failed on it"
    log.write_text("\n".join(lines) + "\n")
    owner = object()
    logtails.watch(owner, lambda: [log, tmp_path / "not-made.log"])
    try:
        # (a workspace the session keeps for its e2e tests may be running too)
        ours = [(title, text) for title, text in logtails.sections() if str(tmp_path) in title]
    finally:
        logtails.unwatch(owner)
    [(title, text)] = ours
    assert title == f"log {log}"
    shown = text.splitlines()
    assert shown[1] == lines[20] and shown[-logtails.TAIL_LINES :] == lines[-logtails.TAIL_LINES :]
    assert "line 100" not in text
    assert not [title for title, _ in logtails.sections() if str(tmp_path) in title]
    # a server the session keeps that wrote nothing while the failed test ran adds nothing
    logtails.watch(owner, lambda: [log])
    try:
        os.utime(log, (1_000_000, 1_000_000))
        assert not [title for title, _ in logtails.sections(since=2_000_000) if str(tmp_path) in title]
        assert [title for title, _ in logtails.sections(since=500_000) if str(tmp_path) in title]
    finally:
        logtails.unwatch(owner)
