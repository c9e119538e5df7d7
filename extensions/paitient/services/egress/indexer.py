"""Row-detection indexes the egress service builds itself, for published versions that have none.

On a host, ingest writes a version's index before the version becomes current, so the service finds it.
Where the service's state is on another volume than the one ingest wrote to (the claim of a Kubernetes hub
pod, while ingest runs on a host that writes the data volumes), the current version of a dataset has no
index there: until one is built, every output of its projects' members is unchecked (the gate forwards
only their small allowance of unchecked bytes). The matcher reports each such version here, and the
indexer builds it from the published data, which the service reads anyway.

Each build runs ``python -m paitient.services.data.rowindex`` as a process of its own, one at a time and at a
lower CPU priority: the service keeps answering while a large version is indexed, and the memory a build
takes is given back when it ends. The index is published atomically (:func:`paitient.services.data.rowindex.save`),
and the matcher loads it at the next output. A build that fails is logged with its reason and tried again
after :data:`RETRY_SECONDS`; the outputs stay unchecked meanwhile.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from paitient.services.data.rowindex import Places

RETRY_SECONDS = 300.0
"""How long after a failed build the same version is tried again."""
REBUILD_SECONDS = 60.0
"""How long after a build the same version is not built again (were a built index still refused, each
output would otherwise ask for it anew)."""
Version = tuple[str, str, int]
"""project, dataset, version."""


@dataclass(frozen=True)
class Built:
    """One build's outcome, as the metrics count it and the log says it."""

    version: Version
    ok: bool
    seconds: float
    detail: str


def builder_command(places: Places, version: Version) -> list[str]:
    project, dataset, number = version
    return [
        sys.executable,
        "-I",
        "-m",
        "paitient.services.data.rowindex",
        f"--state-dir={places.state_dir}",
        f"--data-root={places.data_root}",
        project,
        dataset,
        str(int(number)),
    ]


class Indexer:
    """Builds the indexes it is asked for, one version at a time, in a thread of the service."""

    def __init__(
        self,
        places: Places,
        log: logging.Logger,
        *,
        on_built: Callable[[Built], None] | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ):
        self.places, self.log, self.on_built, self.retry_seconds = places, log, on_built, retry_seconds
        self._cond = threading.Condition()
        self._queue: list[Version] = []
        self._failed: dict[Version, float] = {}
        self._built: dict[Version, float] = {}
        self._building: Version | None = None
        self._process: subprocess.Popen[str] | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def want(self, project: str, dataset: str, version: int) -> None:
        """Ask for ``version``'s index; a version queued, being built, built less than
        :data:`REBUILD_SECONDS` ago or failed less than :attr:`retry_seconds` ago is not asked for twice."""
        v: Version = (project, dataset, int(version))
        with self._cond:
            if self._closed or v in self._queue or v == self._building:
                return
            now = time.monotonic()
            failed, built = self._failed.get(v), self._built.get(v)
            if failed is not None and now - failed < self.retry_seconds:
                return
            if built is not None and now - built < REBUILD_SECONDS:
                return
            self._queue.append(v)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="egress-indexer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def waiting(self) -> int:
        """Versions queued or being built."""
        with self._cond:
            return len(self._queue) + (self._building is not None)

    def idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being built; whether that happened within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._building is None, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop: nothing more is started, and a build under way is ended (the builder takes SIGTERM as an
        exception and removes the temporary folder it was writing; the version has no index until the next
        start builds it)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            process = self._process
            self._cond.notify_all()
        if process is not None and process.poll() is None:
            process.terminate()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                v = self._building = self._queue.pop(0)
            try:
                built = self._build(v)
            except Exception as e:  # never let one version stop the builds of the others
                built = Built(v, False, 0.0, f"{type(e).__name__}: {e}")
            if self._closed:  # ended by the stop: nothing to say, count or remember
                with self._cond:
                    self._building = None
                    self._cond.notify_all()
                return
            self._report(built)
            with self._cond:
                self._building = None
                if built.ok:
                    self._failed.pop(v, None)
                    self._built[v] = time.monotonic()
                else:
                    self._failed[v] = time.monotonic()
                self._cond.notify_all()

    def _report(self, built: Built) -> None:
        project, dataset, number = built.version
        if built.ok:  # a warning, as the missing index was: the operator sees it end
            self.log.warning(
                "egress: built the row index of %s/%s version %d (%.1f s, %s); outputs of its projects are "
                "checked again",
                project,
                dataset,
                number,
                built.seconds,
                built.detail,
            )
        else:
            self.log.error(
                "egress: could not build the row index of %s/%s version %d (outputs of its projects stay "
                "unchecked; tried again in %.0f s): %s",
                project,
                dataset,
                number,
                self.retry_seconds,
                built.detail,
            )
        if self.on_built is not None:
            self.on_built(built)

    def _build(self, v: Version) -> Built:
        started = time.monotonic()
        with self._cond:
            if self._closed:
                return Built(v, False, 0.0, "the service is stopping")
            self._process = process = subprocess.Popen(
                builder_command(self.places, v),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:
            out, err = process.communicate()
        finally:
            with self._cond:
                self._process = None
        seconds = time.monotonic() - started
        if process.returncode != 0:
            reason = err.strip().splitlines()[-1] if err.strip() else f"exit status {process.returncode}"
            return Built(v, False, seconds, reason)
        try:
            entries = int(json.loads(out.strip().splitlines()[-1])["entries"])
        except (ValueError, KeyError, IndexError, TypeError):
            return Built(v, False, seconds, f"the builder's answer is unreadable: {out[-200:]!r}")
        return Built(v, True, seconds, f"{entries:,} entries")
