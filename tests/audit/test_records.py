"""Pure record logic: canonical form and hash, field validation, caps on untrusted details."""

import hashlib
import json

import pytest

from paitient.rules.records import (
    GENESIS,
    RecordError,
    canonical,
    cap_details,
    encode,
    make_record,
    parse_line,
    record_hash,
)


def test_hash_is_sha256_of_canonical_json_without_hash():
    rec = make_record(seq=1, prev=GENESIS, actor="alice", action="cell.execute", object="k", details={"b": 1, "a": "ü"})
    body = {k: v for k, v in rec.items() if k != "hash"}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert rec["hash"] == expected == record_hash(rec)
    assert canonical(rec).isascii() and b'"hash"' not in canonical(rec)
    assert rec["time"].endswith("Z") and len(rec["time"]) == len("2026-11-28T17:06:51.123456Z")


def test_encoded_line_round_trips_and_keeps_field_order():
    rec = make_record(seq=7, prev=GENESIS, actor="bob", action="ledger.reserve", details={"eps": 0.1, "n": [1, 2]})
    line = encode(rec)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert list(json.loads(line)) == ["time", "seq", "actor", "action", "object", "outcome", "details", "prev", "hash"]
    assert parse_line(line[:-1]) == rec


def test_parse_line_names_an_alteration():
    rec = make_record(seq=1, prev=GENESIS, actor="alice", action="airlock.decision", outcome="ok")
    forged = encode(rec).replace(b'"outcome":"ok"', b'"outcome":"denied"')
    with pytest.raises(ValueError, match="hash does not match"):
        parse_line(forged[:-1])
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_line(b'{"time": "2026')


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"actor": ""}, "actor must be a non-empty string"),
        ({"action": "Cell Execute"}, "dotted lower-case name"),
        ({"action": "login"}, "dotted lower-case name"),
        ({"outcome": "maybe"}, "outcome must be one of ok, denied, error"),
        ({"details": ["not", "a", "dict"]}, "details must be a dict"),
        ({"details": {"x": float("nan")}}, "not JSON-serialisable"),
    ],
)
def test_bad_fields_are_refused_with_what_to_do(kwargs, message):
    args = {"actor": "alice", "action": "cell.execute", **kwargs}
    with pytest.raises(RecordError, match=message):
        make_record(seq=1, prev=GENESIS, **args)


def test_unknown_detail_types_become_strings():
    from pathlib import Path

    rec = make_record(seq=1, prev=GENESIS, actor="a", action="ingest.publish", details={"path": Path("/x/y")})
    assert rec["details"] == {"path": "/x/y"}


def test_cap_details_keeps_length_and_digest_of_a_huge_cell():
    code = "print('x')\n" * 100_000
    out = cap_details(
        {"code": code, "kernel": "k1", "parts": ["y" * 500, "short"]}, string_limit=100, total_limit=10_000
    )
    assert out["code"] == code[:100]
    assert out["code_truncated"] == {"length": len(code), "sha256": hashlib.sha256(code.encode()).hexdigest()}
    assert out["kernel"] == "k1"
    assert out["parts"][0] == {"truncated": "y" * 100, "length": 500, "sha256": hashlib.sha256(b"y" * 500).hexdigest()}
    assert out["parts"][1] == "short"


def test_cap_details_drops_oversized_details_to_a_digest():
    many = {f"k{i}": "v" * 50 for i in range(1000)}
    out = cap_details(many, string_limit=100, total_limit=2000)
    assert out["dropped"] is True and out["length"] > 2000 and len(out["sha256"]) == 64


def test_effective_configuration_details(site):
    from paitient.services.audit import config_details, emit

    details = config_details(site)
    assert details["config"]["workspace"]["state_dir"] == str(site.state_dir)
    assert details["config"]["audit"]["rotate_bytes"] == site.audit.rotate_bytes
    assert [p["name"] for p in details["config"]["projects"]] == [p.name for p in site.projects]
    assert details["sha256"] == config_details(site)["sha256"] and len(details["sha256"]) == 64
    rec = emit(site, actor="system", action="config.effective", details=details)
    assert rec["details"]["sha256"] == details["sha256"]
