"""Checks before a request (``airlock.check`` in a notebook): the bound that keeps them from stalling the service.

The airlock's ``check`` operation (:meth:`paitient.services.airlock.core.Airlock.op_check`) runs a request's
checks on a file without filing it. It runs while the caller waits, so it is bounded three ways:

- size: the file may have at most ``AirlockSettings.check_max_bytes`` bytes (read before anything is parsed);
- time: the caller gets an answer within ``AirlockSettings.check_timeout`` seconds, or a ``timeout`` refusal;
- concurrency: at most ``AirlockSettings.check_concurrency`` checks run at once, one per account; another is
  refused as ``busy`` at once instead of queueing. A check that overran its time keeps its place until it ends,
  so an account that sends heavy files stalls only its own next checks and at most that many of the service's
  threads, never the requests, the check worker or the pages.

The slowest check, the membership-inference audit of weights (the researcher's model run over the dataset in
the audit sandbox, up to ``audit_timeout``), is not run before a request: the answer says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from paitient.channel import TIMEOUT, ChannelError

BUSY = "busy"
"""The code of a check refused because the caller's previous one (or too many others) still runs."""

T = TypeVar("T")


class Bounded:
    """Run calls on their own thread, at most ``concurrency`` at once and one per key, waiting ``timeout`` s."""

    def __init__(self, concurrency: int, timeout: float):
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._running: set[str] = set()

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def run(self, key: str, fn: Callable[[], T]) -> T:
        """``fn()``'s result, or :class:`ChannelError` ``busy`` / ``timeout``; what ``fn`` raises is raised here."""
        with self._lock:
            if key in self._running:
                raise ChannelError("your previous check is still running; wait for its answer, then check again", BUSY)
            if len(self._running) >= self.concurrency:
                raise ChannelError(
                    f"the airlock is running {len(self._running)} checks already; try again in a moment "
                    "(or file the request: its checks run after it)",
                    BUSY,
                )
            self._running.add(key)
        box: dict[str, object] = {}

        def work() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e
            finally:
                with self._lock:
                    self._running.discard(key)

        thread = threading.Thread(target=work, name=f"airlock-check-{key}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise ChannelError(
                f"the check took longer than {self.timeout:g} s and was left to finish on its own; make the "
                "output smaller, or file the request: its checks run after it",
                TIMEOUT,
            )
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["result"]  # type: ignore[return-value]
