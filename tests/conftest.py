"""Shared fixtures. Subsystem fixtures live in their own conftest files under tests/<subsystem>/."""

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "extensions" / "paitient"


def _differing_files(left: Path, right: Path) -> list[str]:
    """Python files that differ between two copies of the package (missing on either side counts)."""
    names = {p.relative_to(left) for p in left.rglob("*.py")} | {p.relative_to(right) for p in right.rglob("*.py")}
    return sorted(
        str(n)
        for n in names
        if not ((left / n).is_file() and (right / n).is_file() and filecmp.cmp(left / n, right / n, shallow=False))
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """The tests run the code under extensions/, and so do the hub, servers and kernels they start.

    pytest imports ``paitient`` from extensions/ (``pythonpath`` in pyproject.toml); the processes the
    tests start run the environment's interpreter, which imports whatever copy is installed there. Either
    one being another copy would test code that is not this checkout's, so the run stops here instead.
    """
    import paitient
    from tests import sessionlock, workspacegroup

    sessionlock.acquire()
    _GROUP_EXISTED.append(workspacegroup.exists())
    here = Path(paitient.__file__).resolve().parent
    if here != SOURCE:
        pytest.exit(
            f"the tests imported paitient from {here}, not from {SOURCE}; run pytest from the "
            "repository root (pyproject.toml puts extensions/ on the path)",
            returncode=4,
        )
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import paitient; print(paitient.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    if probe.returncode != 0:
        pytest.exit(
            f"{sys.executable} cannot import paitient: {probe.stderr.strip()[-500:]}; run: bash scripts/setup install",
            returncode=4,
        )
    installed = Path(probe.stdout.strip()).resolve().parent
    if installed != SOURCE:
        stale = _differing_files(SOURCE, installed)
        if stale:
            pytest.exit(
                f"the environment's paitient ({installed}) is another copy than {SOURCE} and differs "
                f"in {len(stale)} file(s), e.g. {', '.join(stale[:5])}; the hub, servers and kernels "
                "the tests start would run it. Run: bash scripts/setup install",
                returncode=4,
            )


_GROUP_EXISTED: list[bool] = []


_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failed test's report ends with the logs of the workspaces and servers it ran against
    (:mod:`tests.logtails`: those written to since its setup began), read before its fixtures stop them
    and remove their directories."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        from tests import logtails

        for title, text in logtails.sections(since=item.stash.get(_STARTED, 0.0) - 1):
            report.sections.append((title, text))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The workspace's group (which the services and the account fixture make) goes at the end of a session
    that made it."""
    from tests import workspacegroup

    if _GROUP_EXISTED == [False] and workspacegroup.exists():
        subprocess.run(["groupdel", workspacegroup.GROUP], capture_output=True)


@pytest.fixture
def world_tmp():
    """A temporary directory other uids can traverse (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="paitient-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        remove_accounts_made_under(path)
        shutil.rmtree(path, ignore_errors=True)


def remove_accounts_made_under(root: Path) -> None:
    """Remove every account a workspace with its state directory under ``root`` made (the comment names the
    state directory): the workers' accounts made at first use and any user account a test left."""
    import pwd

    from paitient import sysaccounts

    if os.geteuid() != 0:
        return
    for pw in pwd.getpwall():
        parsed = sysaccounts.parse_comment(pw.pw_gecos)
        if parsed and (parsed[1] + "/").startswith(f"{root}/") and pw.pw_uid != 0:
            sysaccounts.remove_account(pw.pw_name, pw.pw_uid, home_root=Path(pw.pw_dir).parent)


def _free_name(prefix: str) -> str:
    import pwd
    import secrets

    while True:
        name = f"{prefix}{secrets.token_hex(3)}"
        try:
            pwd.getpwnam(name)
        except KeyError:
            return name


@pytest.fixture
def make_system_user(world_tmp):
    """Create real system accounts (name ``ptt<hex>``, home 0700 under a world-traversable tmp dir).

    Returns a factory ``make(label, member=True) -> pwd.struct_passwd``; every account it made is removed
    afterwards. A ``member`` account is in the workspace's group (as the hub makes its accounts), so it can
    open the services' sockets; ``member=False`` makes an unrelated local account.
    """
    import pwd
    import subprocess

    from tests import accounts, workspacegroup

    made: list[str] = []
    homes = world_tmp / "homes"
    homes.mkdir(mode=0o755)

    def make(label: str = "user", member: bool = True):
        name = _free_name("ptt")
        home = homes / name
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-user-group",
                "--gid",
                "nogroup",
                *(["--groups", str(workspacegroup.gid())] if member else []),
                "--home-dir",
                str(home),
                "--create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                f"paitient test {label}",
                name,
            ],
            check=True,
            capture_output=True,
        )
        made.append(name)
        os.chmod(home, 0o700)
        return pwd.getpwnam(name)

    yield make
    accounts.remove_all(made)


def _new_project_groups():
    from tests.groups import made_groups_removed

    with made_groups_removed():
        yield


@pytest.fixture(autouse=True)
def _remove_project_groups():
    """Publication creates a system group per project (paitient.services.data.access); every group a test
    made is removed after it, so no test leaves one behind or finds one left by another."""
    yield from _new_project_groups()


@pytest.fixture(autouse=True, scope="module")
def _remove_module_project_groups():
    """The same for groups a module's fixtures made (a module-scoped published site)."""
    yield from _new_project_groups()


@pytest.fixture(autouse=True, scope="session")
def _remove_session_project_groups():
    """The same for groups of session-wide fixtures and workspaces (these use an accounts prefix of their own,
    so a test's site with the default prefix never meets them)."""
    yield from _new_project_groups()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the whole session (tests/postgres.py), stopped by its pid at the end. Where
    it cannot run, the tests that need it fail with the reason: the stores must pass on PostgreSQL too."""
    from tests.postgres import Server, Unavailable

    try:
        server = Server()
        server.start()
    except Unavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_db(postgres_server):
    """A new, empty database on the session's server (a ``tests.postgres.Database``: url and passfile)."""
    return postgres_server.database()


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def database(request) -> dict[str, str]:
    """The site's ``[database]`` table, once per backend: empty (SQLite files) and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return request.getfixturevalue("postgres_db").site_table()


@pytest.fixture
def database_site(tmp_path, database):
    """A site whose stores are in ``database`` (parametrised: SQLite files under its state_dir, then PostgreSQL)."""
    from paitient.config import parse

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return parse({"workspace": {"state_dir": str(state)}, "database": database})


@pytest.fixture
def opened_stores():
    """Keeps the stores a test opens (``opened_stores(Store.for_site(site))`` returns the store) and closes each
    at the test's end."""
    opened: list = []

    def keep(store):
        opened.append(store)
        return store

    yield keep
    for store in opened:
        store.close()
