"""``paitient backup DIR`` and ``paitient restore DIR``: a consistent, verifiable copy of a workspace's state.

What a backup holds (``DIR`` is root-only, 0700)::

    manifest.json          format, when, from where, the audit chain's head, every file's SHA-256, size,
                           mode and owner, every folder's mode and owner
    state/...              the state directory's durable part, at the same relative paths:
                             ledger/ledger.sqlite3, airlock/airlock.db, jobs/jobs.sqlite3,
                               egress/egress.sqlite3, hub/jupyterhub.sqlite   (SQLite online backup API;
                               with [database] url these are in PostgreSQL, for pg_dump, and left out)
                             audit/                 the trail up to one record, copied under the writers' lock
                             airlock/blobs/         each request's file
                             jobs/out/, jobs/graphs/ released job outputs, the graphs they ran
                             keys/, public/         the keys (row detection, job signing) and the public key
                             hub/ secrets           cookie secret, proxy and operator tokens
                             accounts.json          the accounts registry (username <-> uid)
                             egress/index/          the row-detection indexes of published datasets
    key/pseudonym.key      the pseudonymisation master key (wherever [workspace] key_file puts it)
    data/...               the published datasets (the data root), unless --without-data
    site/site.toml         the site configuration it ran with (for reference: restore reads --site)

Each SQLite database is copied with SQLite's online backup API, which reads one consistent state even while a
service writes; the audit trail is copied while holding the lock every writer takes, so the copy ends at a
record boundary and its head is recorded in the manifest. Stores are snapshotted one after another (databases,
then blobs and released files, which never change once written, then the audit trail), so records made during
the backup may be in one store's copy and not another's; stop the workspace first for a cut across all stores
at one instant. Nothing is half-written: everything goes to a temporary folder beside ``DIR`` that is renamed
to ``DIR`` once the manifest is written.

Restore checks everything before it writes anything: the audit chain of the copy (an edited, removed or
reordered record is refused, naming the first broken record and its file), that it ends at the head the
manifest recorded, and the SHA-256 of every file. It then builds the new state in a temporary folder beside the
state directory, with the recorded modes and root ownership, and renames it into place.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitlets import Bool

from paitient import __version__
from paitient.app import PaitientCommand
from paitient.config import SiteConfig
from paitient.fsutil import fsync_dir
from paitient.services.audit import trail_dir
from paitient.services.audit.verify import check_trail
from paitient.services.audit.writer import read_head, trail_files

FORMAT = "paitient-backup/1"
MANIFEST = "manifest.json"

SQLITE_DATABASES = (
    "ledger/ledger.sqlite3",
    "airlock/airlock.db",
    "jobs/jobs.sqlite3",
    "egress/egress.sqlite3",
    "hub/jupyterhub.sqlite",
)
"""The services' and the hub's databases, relative to the state directory."""
IN_POSTGRES = ("ledger/", "airlock/", "jobs/jobs.sqlite3", "egress/egress.sqlite3", "hub/")
"""The databases that ``[database] url`` moves to PostgreSQL (the jobs' graphs and released files and the
row-detection indexes beside the egress counts stay files and are copied either way)."""

FILE_TREES = ("airlock/blobs", "jobs/out", "jobs/graphs", "keys", "public", "egress/index")
"""Folders copied file by file (their files are written once and never changed)."""

SINGLE_FILES = (
    "accounts.json",
    "hub/jupyterhub_cookie_secret",
    "hub/proxy_token",
    "hub/operator_token",
    "hub/metrics_token",
)

COPY_CHUNK = 1 << 20


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why and what to do."""


# -- small helpers -------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _regular_files(root: Path) -> Iterator[Path]:
    """Regular files below ``root``, sorted; names starting with '.' (a writer's temporary files, locks) and
    links are left out."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            yield path


def _tree_size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def workspace_runs(state_dir: Path) -> int | None:
    """The pid of the `paitient up` that runs on ``state_dir``, if one does."""
    from paitient.ops.up import Running, pid_alive

    running = Running.read(state_dir / "up.json")
    if running is not None and pid_alive(running.up_pid):
        return running.up_pid
    return None


@dataclass
class Manifest:
    created: str
    source_state_dir: str
    site_source: str
    paitient_version: str
    audit_head: dict[str, Any] | None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    dirs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> bytes:
        return (json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise BackupError(
                f"{directory} holds no {MANIFEST}: not a paitient backup (or an unfinished one)"
            ) from None
        except ValueError as e:
            raise BackupError(f"{path} is not valid JSON ({e}): the backup is damaged") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BackupError(f"{path} is not a {FORMAT} manifest (format {raw.get('format')!r})")
        try:
            return cls(**raw)
        except TypeError as e:
            raise BackupError(f"{path} is not a complete {FORMAT} manifest ({e})") from None


# -- backup --------------------------------------------------------------------------------------------------


class _Writer:
    """Puts files into the staging folder and notes each in the manifest."""

    def __init__(self, stage: Path, manifest: Manifest):
        self.stage = stage
        self.manifest = manifest

    def _target(self, rel: str) -> Path:
        """The staged path of ``rel``, its folders created (0700 while staged)."""
        target = self.stage / rel
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return target

    def note_dir(self, rel: str, source: Path) -> None:
        st = source.stat()
        self.manifest.dirs[rel] = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}

    def _note(self, rel: str, target: Path, source_stat: os.stat_result) -> None:
        os.chmod(target, 0o600)
        _fsync_file(target)
        self.manifest.files[rel] = {
            "sha256": sha256_file(target),
            "size": target.stat().st_size,
            "mode": stat.S_IMODE(source_stat.st_mode),
            "uid": source_stat.st_uid,
            "gid": source_stat.st_gid,
        }

    def copy(self, rel: str, source: Path) -> None:
        target = self._target(rel)
        st = source.stat()
        with open(source, "rb") as src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
        self._note(rel, target, st)

    def sqlite(self, rel: str, source: Path) -> None:
        """Copy a live SQLite database with the online backup API, then check the copy's integrity."""
        target = self._target(rel)
        st = source.stat()
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=60)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file; the service sets WAL again
                (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
        if check != "ok":
            raise BackupError(
                f"the copy of {source} fails SQLite's integrity check ({check}); the source may be damaged"
            )
        self._note(rel, target, st)


def _note_source_dirs(writer: _Writer, prefix: str, root: Path, base: Path) -> None:
    """Record the modes and owners of the source folders between ``base`` and every copied file's folder."""
    for rel in list(writer.manifest.files):
        if not rel.startswith(prefix + "/"):
            continue
        parts = Path(rel).parts[1:-1]
        for i in range(1, len(parts) + 1):
            src = base.joinpath(*parts[:i])
            key = "/".join((prefix, *parts[:i]))
            if src.is_dir():
                writer.note_dir(key, src)
    if root.is_dir():
        writer.note_dir(prefix, root)


@contextlib.contextmanager
def _audit_locked(directory: Path) -> Iterator[None]:
    """Hold the lock every audit writer takes (``<trail>/.lock``), so no record is half-written meanwhile."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def backup(site: SiteConfig, target: Path, *, with_data: bool = True, log=None) -> Manifest:
    """Write a backup of ``site``'s state to ``target`` (which must not exist or be an empty folder)."""
    target = Path(target).absolute()
    state = site.state_dir
    if not state.is_dir():
        raise BackupError(f"no state directory at {state}; pass the --state-dir (or --site) the workspace runs with")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target} exists and is not an empty folder; name a new folder for the backup")
    if target == state or state in target.parents:
        raise BackupError(f"{target} is inside the state directory {state}; put backups elsewhere")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} does not exist; create it first (root only: mkdir -m 700 ...)")

    notes: list[str] = []
    in_postgres = bool(site.database.url)
    if in_postgres:
        notes.append(
            "the hub's, the ledger's, the airlock's, the jobs queue's and the egress counts' records are in "
            "PostgreSQL ([database] url): back that database up with pg_dump at the same time (docs/operations.md); "
            "this backup holds none of them (the jobs' graphs and released files and the row-detection indexes are "
            "files, and are in it)"
        )
    elif site.workspace.ledger_url:
        notes.append(
            "the ledger is in PostgreSQL ([workspace] ledger_url): back it up with pg_dump; this backup holds no ledger"
        )
    sources: list[tuple[str, Path, str]] = []  # (relative path in the backup, source, how)
    for rel in SQLITE_DATABASES:
        if (in_postgres and rel.startswith(IN_POSTGRES)) or (rel.startswith("ledger/") and site.workspace.ledger_url):
            continue  # a SQLite file left from before the move is not the current state
        if (state / rel).is_file():
            sources.append((f"state/{rel}", state / rel, "sqlite"))
    key_file = site.key_file
    for tree in FILE_TREES:
        for path in _regular_files(state / tree):
            if path != key_file:
                sources.append((f"state/{path.relative_to(state)}", path, "copy"))
    for rel in SINGLE_FILES:
        if (state / rel).is_file():
            sources.append((f"state/{rel}", state / rel, "copy"))
    if key_file.is_file():
        sources.append(("key/pseudonym.key", key_file, "copy"))
    else:
        notes.append(f"no pseudonymisation key at {key_file} (nothing was ingested yet)")
    data_root = site.data_root
    if with_data:
        sources += [(f"data/{p.relative_to(data_root)}", p, "copy") for p in _regular_files(data_root)]
    else:
        notes.append(f"made --without-data: the published datasets in {data_root} are not in it")
    if site.source and Path(site.source).is_file():
        sources.append(("site/site.toml", Path(site.source), "copy"))
    audit_dir = trail_dir(site)
    audit_files = [p for p in _regular_files(audit_dir)]

    need = _tree_size([s for _r, s, _h in sources] + audit_files)
    free = shutil.disk_usage(target.parent).free
    if free < need + (need // 10) + (1 << 20):
        raise BackupError(
            f"not enough space in {target.parent}: the backup needs about {need / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB are free; free some or choose another place"
        )

    manifest = Manifest(
        created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        source_state_dir=str(state),
        site_source=site.source or "",
        paitient_version=__version__,
        audit_head=None,
        notes=notes,
    )
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    os.chmod(stage, 0o700)
    writer = _Writer(stage, manifest)
    try:
        for rel, source, how in sources:
            (writer.sqlite if how == "sqlite" else writer.copy)(rel, source)
            if log is not None:
                log.debug("backed up %s", source)
        if audit_dir.is_dir():
            with _audit_locked(audit_dir):
                for path in _regular_files(audit_dir):
                    writer.copy(f"state/audit/{path.relative_to(audit_dir)}", path)
            report = _check_chain(stage / "state" / "audit")
            if not report.ok:
                raise BackupError(
                    f"the audit trail in {audit_dir} is broken: {report.first_problem}; "
                    "nothing was backed up. Investigate with `paitient audit verify` first"
                )
            manifest.audit_head = {"seq": report.last_seq, "hash": report.last_hash, "records": report.records}
        else:
            notes.append(f"no audit trail at {audit_dir} yet")
        _note_source_dirs(writer, "state", state, state)
        _note_source_dirs(writer, "data", data_root, data_root)
        for d in ("state", "key", "site"):
            if (stage / d).is_dir() and d not in manifest.dirs:
                manifest.dirs[d] = {"mode": 0o700, "uid": 0, "gid": 0}
        if manifest.dirs.get("state"):
            manifest.dirs["state"]["mode"] = 0o755
        (stage / MANIFEST).write_bytes(manifest.to_json())
        os.chmod(stage / MANIFEST, 0o600)
        _fsync_file(stage / MANIFEST)
        for dirpath, _dirs, _files in os.walk(stage):
            fsync_dir(Path(dirpath))
        os.rename(stage, target)  # replaces an empty folder; fails on a non-empty one made meanwhile
        os.chmod(target, 0o700)
        fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise BackupError(f"{target.parent} ran out of space during the backup; nothing was kept") from None
        raise BackupError(f"backup failed: {e}; nothing was kept") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _check_chain(audit_copy: Path):
    files = [(p.name, p.read_bytes().splitlines(keepends=True)) for _n, p in trail_files(audit_copy)]
    return check_trail(files, read_head(audit_copy))


# -- restore -------------------------------------------------------------------------------------------------


def verify_backup(source: Path) -> Manifest:
    """Check a backup before anything is restored from it; raises :class:`BackupError` naming what is wrong.

    The audit chain is checked first, so an edited record is named (file, line, seq) rather than only its
    file's changed hash; then every file against the manifest, and that no file was added or removed.
    """
    source = Path(source).absolute()
    if not source.is_dir():
        raise BackupError(f"no backup at {source}")
    manifest = Manifest.read(source)
    audit_copy = source / "state" / "audit"
    if manifest.audit_head is not None:
        report = _check_chain(audit_copy)
        if not report.ok:
            first = report.first_problem
            raise BackupError(
                f"the backup's audit trail is broken, nothing was restored: first broken record in "
                f"state/audit/{first}"
                + (f" ({len(report.problems)} problems in all)" if len(report.problems) > 1 else "")
            )
        if (report.last_seq, report.last_hash) != (manifest.audit_head["seq"], manifest.audit_head["hash"]):
            raise BackupError(
                f"the backup's audit trail ends at seq {report.last_seq}, the manifest recorded seq "
                f"{manifest.audit_head['seq']} (hash {manifest.audit_head['hash'][:16]}...): records were "
                "added or removed; nothing was restored"
            )
    present = {
        str(p.relative_to(source))
        for p in source.rglob("*")
        if (p.is_file() or p.is_symlink()) and p != source / MANIFEST
    }
    missing = sorted(set(manifest.files) - present)
    extra = sorted(present - set(manifest.files))
    if missing:
        raise BackupError(
            f"the backup lacks {len(missing)} file(s) its manifest lists, first {missing[0]}; nothing was restored"
        )
    if extra:
        raise BackupError(
            f"the backup holds {len(extra)} file(s) its manifest does not list, first {extra[0]}; nothing was restored"
        )
    for rel, meta in sorted(manifest.files.items()):
        path = source / rel
        if path.is_symlink():
            raise BackupError(f"{rel} in the backup is a link, not a file; nothing was restored")
        if sha256_file(path) != meta["sha256"]:
            raise BackupError(
                f"{rel} in the backup does not match its SHA-256 in the manifest: it was changed or damaged; "
                "nothing was restored"
            )
    return manifest


def _inside(path: Path, base: Path) -> str | None:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return None


def _fresh(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def restore(site: SiteConfig, source: Path, *, force: bool = False, warn=None) -> Manifest:
    """Restore the backup at ``source`` into ``site``'s state directory, data root and key file."""
    source = Path(source).absolute()
    state = site.state_dir
    if workspace_runs(state):
        raise BackupError(f"a workspace runs on {state}; stop it first (paitient stop --state-dir={state})")
    manifest = verify_backup(source)

    key_rel = _inside(site.key_file, state)
    data_rel = _inside(site.data_root, state)
    places = [state] + ([] if data_rel else [site.data_root]) + ([] if key_rel else [site.key_file])
    taken = [p for p in places if not _fresh(p)]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    if taken and not force:
        raise BackupError(
            f"{taken[0]} is not empty: restore only into a fresh state directory (name a new --state-dir), "
            "or pass --force to move what is there aside first"
        )
    if not state.parent.is_dir():
        raise BackupError(f"{state.parent} does not exist; create it first")

    def staged(where: Path) -> Path:
        s = Path(tempfile.mkdtemp(prefix=f".{where.name}.restore-", dir=where.parent))
        os.chmod(s, 0o700)
        return s

    stages: list[tuple[Path, Path]] = []  # (stage, final place)
    try:
        state_stage = staged(state)
        stages.append((state_stage, state))
        data_stage = state_stage / data_rel if data_rel else staged(site.data_root)
        if not data_rel:
            stages.append((data_stage, site.data_root))
        for rel, meta in sorted(manifest.files.items()):
            top, _, rest = rel.partition("/")
            if top == "state":
                dest = state_stage / rest
            elif top == "data":
                dest = data_stage / rest
            elif top == "key":
                dest = (
                    (state_stage / key_rel)
                    if key_rel
                    else site.key_file.parent / f".{site.key_file.name}.restore-{stamp}"
                )
            else:
                continue  # site/: kept in the backup for reference, restore reads --site
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(source / rel, "rb") as src, open(dest, "xb") as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            os.chown(dest, meta["uid"], meta["gid"])
            os.chmod(dest, meta["mode"])
            if top == "key" and not key_rel:
                stages.append((dest, site.key_file))
        for rel, meta in sorted(manifest.dirs.items(), key=lambda kv: -kv[0].count("/")):
            top, _, rest = rel.partition("/")
            base = {"state": state_stage, "data": data_stage}.get(top)
            if base is None:
                continue
            d = base / rest if rest else base
            if d.is_dir():
                os.chown(d, meta["uid"], meta["gid"])
                os.chmod(d, meta["mode"])
        os.chmod(state_stage, 0o755)
        for dirpath, _dirs, _files in os.walk(state_stage):
            fsync_dir(Path(dirpath))
        # publish: move what is there aside (--force), then rename each staged tree into place
        for stage, final in stages:
            if not _fresh(final):
                aside = final.with_name(f"{final.name}.before-restore-{stamp}")
                if warn is not None:
                    warn(f"--force: moving {final} aside to {aside}")
                os.rename(final, aside)
            elif final.is_dir():
                final.rmdir()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(stage, final)
            fsync_dir(final.parent)
    except BaseException:
        for stage, _final in stages:
            if stage.is_dir():
                shutil.rmtree(stage, ignore_errors=True)
            elif stage.exists():
                stage.unlink()
        raise
    return manifest


# -- commands ------------------------------------------------------------------------------------------------


class _DirCommand(PaitientCommand):
    def parse_command_line(self, argv=None):
        super().parse_command_line(argv)
        self.directory = self.extra_args[0] if len(self.extra_args) == 1 else ""

    def need_directory(self) -> Path:
        if not self.directory:
            self.fail(f"name one folder: paitient {self.name} DIR  (--help for options)")
        return Path(self.directory)


class BackupCommand(_DirCommand):
    name = "backup"
    description = (
        "Write a consistent backup of the workspace's state to DIR (a new folder, root only): the ledger, the "
        "airlock's store, the audit trail with its chain head, the keys, released job outputs, the published "
        "data and the site configuration, with a manifest of every file's SHA-256. It may run while the "
        "workspace runs."
    )
    examples = "paitient backup /srv/backup/paitient-$(date +%F) --site=/etc/paitient/site.toml"
    without_data = Bool(False, help="Leave the published datasets (the data root) out.").tag(config=True)
    flags = {"without-data": ({"BackupCommand": {"without_data": True}}, "Leave the published datasets out.")}

    def start(self) -> None:
        target = self.need_directory()
        self.require_root()
        site = self.load_site()
        try:
            manifest = backup(site, target, with_data=not self.without_data, log=self.log)
        except BackupError as e:
            self.fail(str(e))
        head = manifest.audit_head
        print(f"paitient: backup of {site.state_dir} written to {target.absolute()} ({len(manifest.files)} files)")
        if head:
            print(f"  audit trail: {head['records']} records, ends at seq {head['seq']} hash {head['hash']}")
        for note in manifest.notes:
            print(f"  note: {note}")


class RestoreCommand(_DirCommand):
    name = "restore"
    description = (
        "Restore the backup in DIR into a fresh state directory (--state-dir or the site's). Checks the audit "
        "chain and every file's SHA-256 before writing anything; refuses a backup whose trail was edited, "
        "naming the first broken record."
    )
    examples = "paitient restore /srv/backup/paitient-2026-01-31 --site=/etc/paitient/site.toml"
    force = Bool(
        False, help="Restore although the state directory is not empty: what is there is moved aside first."
    ).tag(config=True)
    flags = {"force": ({"RestoreCommand": {"force": True}}, "Move an existing state directory aside and restore.")}

    def start(self) -> None:
        source = self.need_directory()
        self.require_root()
        site = self.load_site()
        if self.force:
            print(
                f"paitient restore: WARNING --force: the state in {site.state_dir} will be moved aside and "
                "replaced by the backup",
                file=sys.stderr,
            )
        try:
            manifest = restore(
                site, source, force=self.force, warn=lambda m: print(f"paitient restore: {m}", file=sys.stderr)
            )
        except BackupError as e:
            self.fail(str(e))
        from paitient.services.audit.verify import verify_dir

        report = verify_dir(trail_dir(site))
        if not report.ok:  # verified before the copy; a difference now is a fault of this machine
            self.fail(f"the restored audit trail does not verify: {report.first_problem}")
        print(f"paitient: restored {source.absolute()} ({manifest.created}) into {site.state_dir}")
        print(f"  audit trail verified: {report.records} records, ends at seq {report.last_seq}")
        for note in manifest.notes:
            print(f"  note: {note}")
        print(f"  start it: paitient up --state-dir={site.state_dir}  (or systemctl start paitient.target)")
