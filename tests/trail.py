"""The audit trail taken down for real, for the tests that show what fails closed while it is down: its
directory made group-writable, which the trail's writer refuses to write in (as it would a directory an
operator left open)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from paitient.services.audit import trail_dir
from paitient.services.audit.writer import trail_files


@contextmanager
def trail_down(site: Any) -> Iterator[None]:
    """The site's audit trail refuses every write until the block ends."""
    directory = trail_dir(site)
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.chmod(directory, 0o770)
    try:
        yield
    finally:
        os.chmod(directory, 0o750)


def trail_records(site: Any, action_prefix: str = "", *, action: str | None = None) -> list[dict[str, Any]]:
    """The trail's records whose action starts with ``action_prefix`` (or is ``action``), in the chain's order."""
    records = []
    for _, path in trail_files(trail_dir(site)):
        for line in path.read_bytes().splitlines():  # (bytes: a record may hold a line separator in its text)
            record = json.loads(line)
            if record["action"].startswith(action_prefix) and action in (None, record["action"]):
                records.append(record)
    return records
