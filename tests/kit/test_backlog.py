"""The backlog's file of held records (the hub's): a crash mid-append loses no record held before it."""

from __future__ import annotations

import json
import stat

from paitient.services.kit.backlog import HeldFile


def test_a_line_a_crash_cut_short_is_skipped_and_the_records_before_and_after_it_are_kept(tmp_path):
    held = HeldFile(tmp_path / "hub" / "held-records.jsonl")
    assert held.held() == []
    assert held.hold([{"n": 1}, {"n": 2}]) == [1, 2]
    with open(held.path, "ab") as f:  # an append the process was killed in the middle of
        f.write(json.dumps({"seq": 3, "held": 0, "record": {"n": 3}}).encode()[:17])
    assert held.held() == [(1, {"n": 1}), (2, {"n": 2})]
    assert held.hold([{"n": 4}]) == [3]  # on a line of its own, after the cut one
    assert held.held() == [(1, {"n": 1}), (2, {"n": 2}), (3, {"n": 4})]
    assert stat.S_IMODE(held.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(held.path.parent.stat().st_mode) == 0o700
    held.drop([1, 3])
    assert held.held() == [(2, {"n": 2})]
    assert stat.S_IMODE(held.path.stat().st_mode) == 0o600
    held.drop([2])
    assert not held.path.exists() and held.held() == []
