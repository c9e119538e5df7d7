"""Who reads published data: a project's members, through its group; nobody else, and nobody changes it.

Real system accounts: a member of the dataset's project, a member of another project and an account in
no project. Each runs as a fresh process with the groups the system gives it now (``setpriv
--init-groups``, as the spawner starts a server), walks the data root and tries to read every file.
"""

import grp
import hashlib
import os
import secrets
import stat
import subprocess
import sys
import textwrap

import pytest

from paitient.config import load
from paitient.registry import Member, Registry
from paitient.services.data import access, keys, rowindex
from paitient.services.data import ingest as ing

from .conftest import COLUMNS, HEADER, PATIENTS, make_spec, write_csv

WALK = """
import json, os, sys
read, listed, refused = [], [], []
def attempt(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        read.append(path)
    except OSError as e:
        refused.append([path, e.errno])
def walk(top):
    try:
        names = os.listdir(top)
    except OSError as e:
        refused.append([top, e.errno])
        return
    listed.append(top)
    for n in names:
        p = os.path.join(top, n)
        if os.path.isdir(p) and not os.path.islink(p):
            walk(p)
        else:
            attempt(p)
for top in sys.argv[1:]:
    walk(top)
    if os.path.isfile(top):
        attempt(top)
print(json.dumps({"read": read, "listed": listed, "refused": refused}))
"""


@pytest.fixture
def published(world_tmp, make_system_user):
    site = load(
        None,
        overrides={
            "workspace": {"state_dir": str(world_tmp / "state"), "min_k": 2},
            "accounts": {"prefix": "t" + secrets.token_hex(2)},
        },
    )
    keys.ensure_key(site)
    member, other, stranger = make_system_user("member"), make_system_user("other"), make_system_user("stranger")
    registry = Registry.for_state_dir(site.state_dir)
    registry.put(Member(username="member", account=member.pw_name, uid=member.pw_uid, projects=("oncology",)))
    registry.put(Member(username="other", account=other.pw_name, uid=other.pw_uid, projects=("cardiometabolic",)))
    src = write_csv(world_tmp / "patients.csv", HEADER, PATIENTS)
    pub = ing.ingest(site, make_spec(src, COLUMNS, patient_id="mrn"), operator="t")
    access.sync(site)
    return site, pub, {"member": member, "other": other, "stranger": stranger}


def as_user(pw, code: str, *args: str, **env) -> subprocess.CompletedProcess:
    """``code`` as ``pw``'s account with the groups /etc/group gives it now."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            "--init-groups",
            sys.executable,
            "-c",
            textwrap.dedent(code),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def walk_as(pw, *tops) -> dict:
    import json

    r = as_user(pw, WALK, *map(str, tops))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_data_is_the_project_groups_and_only_the_projects_members_are_in_it(published):
    site, pub, users = published
    gid = grp.getgrnam(access.group_name(site, "oncology")).gr_gid
    assert grp.getgrgid(gid).gr_mem == [users["member"].pw_name]
    assert grp.getgrnam(access.group_name(site, "cardiometabolic")).gr_mem == [users["other"].pw_name]
    st = os.stat(site.data_root)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o711)
    for top, _dirs, files in os.walk(site.data_root / "oncology"):
        for path, mode in [(top, 0o750)] + [(os.path.join(top, f), 0o440) for f in files]:
            st = os.stat(path)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, mode), path


@pytest.mark.parametrize("who", ["other", "stranger"])
def test_a_non_member_walking_the_data_root_reads_nothing(published, who):
    site, pub, users = published
    seen = walk_as(users[who], site.data_root, site.data_root / "oncology", pub.path / "data.parquet")
    assert seen["read"] == [] and seen["listed"] == [], seen
    # every attempt was refused by the file modes (EACCES), not missed
    assert {e for _, e in seen["refused"]} == {13}
    assert {p for p, _ in seen["refused"]} == {
        str(site.data_root),
        str(site.data_root / "oncology"),
        str(pub.path / "data.parquet"),
    }


def test_a_member_reads_their_projects_data_and_nothing_of_the_keys_or_indexes(published):
    site, pub, users = published
    current = site.data_root / "oncology" / "breast_cancer" / "current" / "data.parquet"
    r = as_user(
        users["member"],
        f"""
        import pyarrow.parquet as pq
        df = pq.read_table({str(current)!r}).to_pandas()
        print(len(df), df["patient"].str.startswith("P-").all())
        """,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["6", "True"]
    index = rowindex.index_dir(site, "oncology", "breast_cancer", pub.version)
    assert index.is_dir()
    seen = walk_as(users["member"], site.key_file, rowindex.key_path(site), index, index / "header.json")
    assert seen["read"] == [] and seen["listed"] == [], seen


def test_the_group_follows_a_membership_change(published):
    site, pub, users = published
    registry = Registry.for_state_dir(site.state_dir)
    member, other = users["member"], users["other"]
    registry.put(Member(username="member", account=member.pw_name, uid=member.pw_uid, projects=()))
    registry.put(
        Member(username="other", account=other.pw_name, uid=other.pw_uid, projects=("cardiometabolic", "oncology"))
    )
    access.sync_members(site)
    assert grp.getgrnam(access.group_name(site, "oncology")).gr_mem == [other.pw_name]
    assert walk_as(member, pub.path / "data.parquet")["read"] == []
    assert walk_as(other, pub.path / "data.parquet")["read"] == [str(pub.path / "data.parquet")]


def test_a_group_another_live_workspace_uses_is_left_alone(published, world_tmp):
    site, _, _ = published
    ours = grp.getgrnam(access.group_name(site, "oncology"))
    stranger_site = load(
        None,
        overrides={"workspace": {"state_dir": str(world_tmp / "state2")}, "accounts": {"prefix": site.accounts.prefix}},
    )
    gid = access.ensure_group(stranger_site, "oncology")
    theirs = access.group_name(stranger_site, "oncology")
    assert gid != ours.gr_gid and theirs.startswith(ours.gr_name + "-") and len(theirs) <= 32
    assert grp.getgrnam(ours.gr_name).gr_mem == ours.gr_mem  # the live workspace's members untouched
    subprocess.run(["groupdel", theirs], check=True, capture_output=True)


def test_a_group_someone_else_made_is_refused(published, world_tmp, make_system_user):
    site, _, _ = published
    stranger_site = load(
        None,
        overrides={"workspace": {"state_dir": str(world_tmp / "state3")}, "accounts": {"prefix": site.accounts.prefix}},
    )
    # the plain name and this workspace's own suffixed name both taken by groups paitient did not make
    suffixed = access._candidate(
        stranger_site, "oncology", hashlib.sha256(str(stranger_site.state_dir).encode()).hexdigest()[:6]
    )
    outsider = make_system_user("outsider").pw_name  # not an account a workspace made
    subprocess.run(["groupadd", "--system", "--users", outsider, suffixed], check=True, capture_output=True)
    try:
        with pytest.raises(access.AccessError, match="paitient did not create for project 'oncology'"):
            access.ensure_group(stranger_site, "oncology")
    finally:
        subprocess.run(["groupdel", suffixed], capture_output=True)


def test_a_member_cannot_change_publish_or_switch_anything(published):
    site, pub, users = published
    ds = pub.path.parent.parent
    r = as_user(
        users["member"],
        f"""
        import os
        attempts = {{
            "append to data": lambda: open({str(pub.path / "data.parquet")!r}, "ab"),
            "rename manifest": lambda: os.rename({str(pub.path / "manifest.json")!r}, {str(pub.path / "m.json")!r}),
            "add a file to the version": lambda: open({str(pub.path / "extra")!r}, "w"),
            "add a version": lambda: os.mkdir({str(ds / "versions" / "2")!r}),
            "switch current": lambda: os.symlink("/etc", {str(ds / "current.new")!r}),
            "remove current": lambda: os.unlink({str(ds / "current")!r}),
            "new dataset": lambda: os.mkdir({str(site.data_root / "oncology" / "gbsg2")!r}),
            "read the key": lambda: open({str(site.key_file)!r}, "rb").read(),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "SUCCEEDED")
            except PermissionError:
                print(name, "denied")
    """,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all(line.endswith(" denied") for line in lines), r.stdout


def test_the_start_gives_older_data_to_its_group_and_unknown_folders_to_root(published):
    site, _, users = published
    old = site.data_root / "oncology" / "older" / "versions" / "1"
    old.mkdir(parents=True)
    (old / "data.csv").write_text("id\n1\n")
    stray = site.data_root / "retired"
    stray.mkdir()
    (stray / "data.csv").write_text("id\n2\n")
    for p in (old.parent.parent, old.parent, old, old / "data.csv", stray, stray / "data.csv"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)  # world-readable, as data published before the groups
    os.chmod(site.data_root, 0o755)
    assert access.sync(site) == ["retired"]
    gid = grp.getgrnam(access.group_name(site, "oncology")).gr_gid
    st = os.stat(old / "data.csv")
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o440)
    assert stat.S_IMODE(os.stat(site.data_root).st_mode) == 0o711
    assert (stat.S_IMODE(os.stat(stray).st_mode), stat.S_IMODE(os.stat(stray / "data.csv").st_mode)) == (0o700, 0o400)
    assert walk_as(users["member"], old / "data.csv")["read"] == [str(old / "data.csv")]
    for who in ("other", "stranger"):
        assert walk_as(users[who], old / "data.csv", stray / "data.csv")["read"] == []
    assert walk_as(users["member"], stray / "data.csv")["read"] == []
