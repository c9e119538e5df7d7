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
