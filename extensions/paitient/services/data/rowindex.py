"""Row-detection indexes of published dataset versions, and their key: root-only, beside the data.

    <state_dir>/keys/edm.key                                       32 random bytes, root 0600
    <state_dir>/egress/index/<project>/<dataset>/<version>/        root 0700
        header.json   entries.npy   dir.npy                        root 0600

The index (:mod:`paitient.rules.edm`) holds keyed fingerprints of each version's distinctive values;
the egress service loads it, with the key, to tell which rows an outgoing text reveals. Neither may
be readable by a researcher's account: with both, the values of a dataset could be tested one by one.
So they live outside the data root (which members read), in folders only root can enter.

Ingest builds a version's index before the version becomes current. Where the indexes live on another
volume than ingest writes to (the services' claim of a Kubernetes hub pod), the egress service builds the
missing ones itself: ``python -m paitient.services.data.rowindex`` indexes one version in a process of its
own (:mod:`paitient.services.egress.indexer`).

A version's index is written into a temporary folder beside its place, fsync'd and renamed into
place (a rebuilt index replaces the old one the same way), so a reader finds a whole index or none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq

from paitient.config import ConfigError
from paitient.fsutil import fsync_dir
from paitient.rules.edm import KEY_BYTES, EDMIndex, IndexError_, Keyed
from paitient.services.data.publish import DATA_FILE, dataset_dir, read_manifest, versions
from paitient.services.kit.secretfile import create_secret, private_dirs, read_secret

KEY_NAME = "edm.key"
"""The row-detection key's file name, in ``<state_dir>/keys/``."""
INDEX_ROOT = ("egress", "index")
"""Where indexes live, below the state directory."""
HEADER = "header.json"


class Places(Protocol):
    """Where indexes and data live: a :class:`~paitient.config.SiteConfig`, or :class:`Folders`."""

    @property
    def state_dir(self) -> Path: ...

    @property
    def data_root(self) -> Path: ...


@dataclass(frozen=True)
class Folders:
    """The two folders an index is built from and into, for a process that has no site configuration."""

    state_dir: Path
    data_root: Path


class IndexRefused(Exception):
    """A row-detection index or its key cannot be built, saved or used; the message says what to do."""


def key_path(site: Places) -> Path:
    return site.state_dir / "keys" / KEY_NAME


def index_root(site: Places) -> Path:
    return site.state_dir.joinpath(*INDEX_ROOT)


def index_dir(site: Places, project: str, dataset: str, version: int) -> Path:
    return index_root(site) / project / dataset / str(int(version))


def ensure_key(site: Places) -> bytes:
    """The row-detection key, created on first use (32 random bytes, root 0600), checked either way."""
    create_secret(site.state_dir, key_path(site), KEY_BYTES)  # never replaces a key created meanwhile
    return load_key(site)


def load_key(site: Places) -> bytes:
    """Read the key, refusing a missing, short, non-root or group/world-accessible file."""
    try:
        return read_secret(
            key_path(site),
            min_bytes=KEY_BYTES,
            what="row-detection key",
            remedy="`paitient datasets --reindex` makes a new one and rebuilds every index with it",
        )
    except ConfigError as e:
        raise IndexRefused(f"row-detection key refused: {e}") from None


def primary_columns(manifest: dict[str, Any]) -> list[str]:
    """The published columns the manifest says are pseudonyms: each one identifies its rows."""
    return [c["name"] for c in manifest.get("columns", []) if c.get("action") == "pseudonym"]


def build(table: Any, manifest: dict[str, Any], key: bytes) -> EDMIndex:
    """Index a version's table (as published: the row order is the row id)."""
    try:
        return EDMIndex.build(table, key=Keyed(key), primary_columns=primary_columns(manifest))
    except (IndexError_, ValueError) as e:
        raise IndexRefused(f"row-detection index: {e}") from None


def save(site: Places, index: EDMIndex, path: Path) -> Path:
    """Publish ``index`` at ``path`` (a version's folder under the site's index root) whole or not at
    all; replaces an older one."""
    private_dirs(site.state_dir, path.parent)
    tmp = path.parent / f".tmp-{path.name}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)
    try:
        for name, arr in index.arrays().items():
            _write(tmp / f"{name}.npy", lambda f, a=arr: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
        body = json.dumps(index.header, indent=2, sort_keys=True) + "\n"
        _write(tmp / HEADER, lambda f: f.write(body.encode()))
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".old-{path.name}-{secrets.token_hex(4)}"
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(path: Path, fill) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(path.parent)


def load(path: Path, key: bytes, *, mmap: bool = True) -> EDMIndex:
    """Open a saved index; ``mmap`` maps the arrays instead of reading them (pages load on demand)."""
    try:
        header = json.loads((path / HEADER).read_text(encoding="utf-8"))
        arrays = {
            name: np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            for name in ("entries", "dir")
        }
        return EDMIndex(header, arrays, Keyed(key))
    except FileNotFoundError:
        raise IndexRefused(f"no row-detection index at {path}; build it with `paitient datasets --reindex`") from None
    except (IndexError_, ValueError, KeyError) as e:
        raise IndexRefused(
            f"row-detection index at {path} is unusable ({e}); rebuild it: paitient datasets --reindex"
        ) from None


@dataclass(frozen=True)
class Reindexed:
    project: str
    dataset: str
    version: int
    entries: int
    path: Path


def stale(site: Places, project: str, dataset: str, version: int, key: bytes) -> bool:
    """Whether the version has no usable index for ``key`` (missing, another key, another format)."""
    try:
        load(index_dir(site, project, dataset, version), key)
    except IndexRefused:
        return True
    return False


def reindex(site: Places, *, project: str = "", every: bool = False) -> list[Reindexed]:
    """Build the indexes of published versions that have none (or, with ``every``, all of them)."""
    key = ensure_key(site)
    done = []
    root = Path(site.data_root)
    projects = [project] if project else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for proj in projects:
        pdir = root / proj
        if not pdir.is_dir():
            raise IndexRefused(f"no published datasets of project {proj!r} under {root}")
        for ds in sorted(d.name for d in pdir.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for version in versions(dataset_dir(root, proj, ds)):
                if not every and not stale(site, proj, ds, version, key):
                    continue
                done.append(reindex_version(site, proj, ds, version, key))
    return done


def reindex_version(site: Places, project: str, dataset: str, version: int, key: bytes) -> Reindexed:
    ds = dataset_dir(site.data_root, project, dataset)
    manifest = read_manifest(ds, version)
    if manifest is None:
        raise IndexRefused(f"{project}/{dataset} version {version} has no readable manifest; it cannot be indexed")
    table = pq.read_table(ds / "versions" / str(version) / DATA_FILE)
    index = build(table, manifest, key)
    path = save(site, index, index_dir(site, project, dataset, version))
    return Reindexed(project, dataset, version, len(index), path)


def main(argv: list[str] | None = None) -> int:
    """Index one published version (the egress service's builder process): prints the result as one JSON
    line, or the reason on stderr with exit status 1. Runs at a lower CPU priority than the service."""
    parser = argparse.ArgumentParser(
        prog="python -m paitient.services.data.rowindex",
        description="Build the row-detection index of one published dataset version (root only).",
    )
    parser.add_argument("--state-dir", required=True, type=Path, help="the site's state directory")
    parser.add_argument("--data-root", required=True, type=Path, help="the site's data root")
    parser.add_argument("project")
    parser.add_argument("dataset")
    parser.add_argument("version", type=int)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("row-detection indexes are root's: run as root", file=sys.stderr)
        return 1
    with contextlib.suppress(OSError):
        os.nice(10)
    # stopped by the service: end as an exception, so that a folder being written is removed (save's cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    places = Folders(args.state_dir.absolute(), args.data_root.absolute())
    try:
        done = reindex_version(places, args.project, args.dataset, args.version, ensure_key(places))
    except IndexRefused as e:
        print(str(e), file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # an unreadable or malformed published file
        print(f"{args.project}/{args.dataset} version {args.version} cannot be indexed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**asdict(done), "path": str(done.path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
