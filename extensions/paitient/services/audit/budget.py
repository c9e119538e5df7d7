"""Each account's daily byte budget for the details its server and kernels have recorded.

The socket's rate limit counts requests; this counts bytes. An account's user side (its server and kernels,
any non-root caller of ``audit.sock``) may have ``[audit] user_daily_bytes`` of details and objects recorded
in the last 24 hours (as the trail writes them), counted in hourly slots (a slot leaves the window 24 hours
after its hour began). Past the budget an event is still recorded, with its details replaced by
:func:`over_budget_details` (length and SHA-256) and a long object cut (:func:`over_budget_object`), so the
trail keeps that it happened and grows by at most the budget plus small records. Nothing is refused for it:
the user's server records a cell before it runs, and a refused record would be a refused cell.

The counts are kept in ``<state_dir>/audit-budget.json`` (root only, 0600), written at most every
:data:`SAVE_SECONDS` and when the service stops, so a restart of the service does not give an account a
fresh budget (a crash loses at most the last few seconds of counting).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paitient.fsutil import atomic_write_json

SLOT_SECONDS = 3600
WINDOW_SLOTS = 24
NOTICE_SECONDS = 3600.0
"""At most one ``audit.budget`` record per account in this many seconds."""
SAVE_SECONDS = 5.0
STATE_FILE = "audit-budget.json"
BUDGET_ACTION = "audit.budget"

log = logging.getLogger("paitient.services.audit.budget")


def details_size(details: dict[str, Any]) -> tuple[int, str]:
    """The bytes of ``details`` as canonical JSON (as the trail keeps them, give or take spacing) and their SHA-256."""
    raw = json.dumps(details, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return len(raw), hashlib.sha256(raw).hexdigest()


def over_budget_details(size: int, digest: str, budget: int) -> dict[str, Any]:
    """What stands in for the details of an event past its account's budget."""
    return {"over_budget": True, "length": size, "sha256": digest, "budget_bytes": budget}


OVER_BUDGET_OBJECT_BYTES = 128
"""Past its account's budget, an event's object is kept to this many bytes of the trail's JSON."""


def object_size(obj: str) -> int:
    """The bytes ``obj`` takes in the trail, which writes ASCII JSON: a character outside ASCII is an escape of
    6 bytes, 12 for one outside the Basic Multilingual Plane (1,024 emoji are 12 kB, not 1 kB)."""
    return len(json.dumps(obj))


def over_budget_object(obj: str) -> tuple[str, dict[str, Any]]:
    """What stands in for the object of an event past its account's budget: the object itself when it takes at
    most :data:`OVER_BUDGET_OBJECT_BYTES` in the trail, else its longest prefix that fits with ``...`` after it,
    and the whole one's length and SHA-256 for the details."""
    if object_size(obj) <= OVER_BUDGET_OBJECT_BYTES:
        return obj, {}
    room, end = OVER_BUDGET_OBJECT_BYTES - len('"..."'), 0
    for c in obj:
        room -= object_size(c) - 2
        if room < 0:
            break
        end += 1
    digest = hashlib.sha256(obj.encode("utf-8", "surrogatepass")).hexdigest()
    return obj[:end] + "...", {"object_length": len(obj), "object_sha256": digest}


class ByteBudget:
    """Bytes charged per account in hourly slots over the last :data:`WINDOW_SLOTS` hours. Thread-safe."""

    def __init__(self, limit: int, path: Path | None = None, *, clock: Callable[[], float] = time.time):
        self.limit = limit
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._slots: dict[str, dict[int, int]] = {}
        self._noticed: dict[str, float] = {}
        self._saved = 0.0
        self._dirty = False
        if path is not None:
            self._load(path)

    def _window(self) -> int:
        """The oldest slot still in the window."""
        return int(self.clock() // SLOT_SECONDS) - WINDOW_SLOTS + 1

    def used(self, account: str) -> int:
        with self._lock:
            return self._used(account, self._window())

    def _used(self, account: str, oldest: int) -> int:
        slots = self._slots.get(account)
        if not slots:
            return 0
        for old in [s for s in slots if s < oldest]:
            del slots[old]
        return sum(slots.values())

    def charge(self, account: str, size: int) -> tuple[bool, int]:
        """Count ``size`` bytes for ``account`` if they fit its budget: ``(True, used after)``; else count nothing
        and answer ``(False, used)``."""
        with self._lock:
            oldest = self._window()
            used = self._used(account, oldest)
            if used + size > self.limit:
                return False, used
            slot = int(self.clock() // SLOT_SECONDS)
            slots = self._slots.setdefault(account, {})
            slots[slot] = slots.get(slot, 0) + size
            self._dirty = True
            if len(self._slots) > 100_000:  # accounts with nothing left in the window
                self._slots = {a: s for a, s in self._slots.items() if self._used(a, oldest)}
        self.save(force=False)
        return True, used + size

    def should_notice(self, account: str) -> bool:
        """True the first time an account is over its budget in :data:`NOTICE_SECONDS` (and remembers it)."""
        now = self.clock()
        with self._lock:
            if now - self._noticed.get(account, float("-inf")) < NOTICE_SECONDS:
                return False
            self._noticed[account] = now
            self._dirty = True
        self.save(force=False)
        return True

    def save(self, *, force: bool = True) -> None:
        """Write the counts to the state file (when one is set): now, or if ``force`` is false at most every
        :data:`SAVE_SECONDS`. A failure is logged; the counts stay in memory."""
        if self.path is None:
            return
        with self._lock:
            now = time.monotonic()
            if not self._dirty or (not force and now - self._saved < SAVE_SECONDS):
                return
            oldest = self._window()
            state = {
                "slot_seconds": SLOT_SECONDS,
                "accounts": {
                    a: {str(k): v for k, v in self._slots[a].items()}
                    for a in list(self._slots)
                    if self._used(a, oldest)
                },
                "noticed": {a: t for a, t in self._noticed.items() if self.clock() - t < NOTICE_SECONDS},
            }
            self._saved = now
            self._dirty = False
        try:
            atomic_write_json(self.path, state, mode=0o600)
        except OSError as e:
            log.error("audit: could not keep the accounts' byte budgets in %s: %s", self.path, e)

    def _load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
            if state.get("slot_seconds") != SLOT_SECONDS:
                raise ValueError("another slot size")
            self._slots = {
                str(a): {int(k): int(v) for k, v in slots.items()} for a, slots in state.get("accounts", {}).items()
            }
            self._noticed = {str(a): float(t) for a, t in state.get("noticed", {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.error("audit: the byte budgets in %s cannot be read (%s); counting from zero", path, e)
            self._slots, self._noticed = {}, {}
