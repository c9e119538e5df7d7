"""The signed training record: every way to forge, edit or mismatch one fails with its own reason."""

import copy
import hashlib
import math

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from paitient.rules import training_record as tr

WEIGHTS = b"safetensors bytes of the runner's own parameters"


def record(**change):
    r = {
        "job_id": "job-3f2a9c",
        "project": "oncology",
        "dataset": "breast_cancer",
        "dataset_version": 1,
        "dataset_sha256": "a" * 64,
        "n_train": 455,
        "n_holdout": 114,
        "features": ["mean radius", "mean texture"],
        "target": "target",
        "preprocessing": [{"op": "standardise", "columns": ["mean radius"], "mean": [14.1], "std": [3.5]}],
        "graph_sha256": "b" * 64,
        "initialisation": {"scheme": "kaiming_uniform", "seed": 1234},
        "sampling_rate": 64 / 455,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "steps": 140,
        "epsilon": 0.98,
        "delta": 1e-5,
        "accountant": "prv",
        "weights_sha256": hashlib.sha256(WEIGHTS).hexdigest(),
        "metrics": {"test_accuracy": 0.96, "mia_auc_gap": 0.02},
        "runner_version": "0.1.0",
        "finished": "2026-12-04T10:00:00Z",
    }
    r.update(change)
    return r


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


def test_a_record_of_a_job_from_a_checkpoint_names_its_sha256_and_name(key):
    started = {"checkpoint": "c" * 64, "name": "mlp-public"}
    envelope = tr.sign(record(initialisation=started), key)
    assert tr.verify(envelope, key.public_key(), WEIGHTS)["initialisation"] == started


def test_a_signed_record_verifies_with_its_weights(key):
    envelope = tr.sign(record(), key)
    assert tr.verify(envelope, key.public_key(), WEIGHTS) == record()
    assert envelope["key_id"] == tr.key_id(key.public_key()) and len(envelope["key_id"]) == 16


def test_a_record_survives_a_trip_through_json(key):
    import json

    envelope = json.loads(json.dumps(tr.sign(record(), key)))
    assert tr.verify(envelope, key.public_key(), WEIGHTS)["sampling_rate"] == 64 / 455


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon", 0.01), ("noise_multiplier", 5.0), ("weights_sha256", "c" * 64), ("steps", 141), ("n_train", 454)],
)
def test_a_record_edited_after_signing_fails(key, field, value):
    envelope = tr.sign(record(), key)
    envelope["record"][field] = value
    with pytest.raises(tr.RecordInvalid, match="changed after it was signed"):
        tr.verify(envelope, key.public_key())


def test_a_record_signed_with_another_key_fails(key):
    other = Ed25519PrivateKey.generate()
    forged = tr.sign(record(), other)
    with pytest.raises(tr.RecordInvalid, match="not this workspace's"):
        tr.verify(forged, key.public_key())
    # naming the workspace's key id does not help: the signature is still another key's
    forged["key_id"] = tr.key_id(key.public_key())
    with pytest.raises(tr.RecordInvalid, match="changed after it was signed, or signed with another key"):
        tr.verify(forged, key.public_key())


def test_weights_other_than_the_signed_ones_fail(key):
    envelope = tr.sign(record(), key)
    with pytest.raises(tr.RecordInvalid, match="not the weights the runner trained"):
        tr.verify(envelope, key.public_key(), WEIGHTS + b"\0")


def test_a_broken_envelope_says_what_is_wrong(key):
    envelope = tr.sign(record(), key)
    with pytest.raises(tr.RecordInvalid, match="exactly format, key_id, record and signature"):
        tr.verify({k: v for k, v in envelope.items() if k != "signature"}, key.public_key())
    with pytest.raises(tr.RecordInvalid, match="is not paitient.training-record/1"):
        tr.verify({**envelope, "format": "other/1"}, key.public_key())
    with pytest.raises(tr.RecordInvalid, match="not base64"):
        tr.verify({**envelope, "signature": "***"}, key.public_key())
    with pytest.raises(tr.RecordInvalid, match="changed after"):
        tr.verify({**envelope, "record": "text"}, key.public_key())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon": math.nan}, "epsilon must be"),
        ({"epsilon": -1.0}, "epsilon must be"),
        ({"delta": 1.0}, "delta must be"),
        ({"sampling_rate": 0}, "sampling_rate must be"),
        ({"steps": True}, "steps must be"),
        ({"accountant": "gdp"}, "accountant must be one of rdp, prv"),
        ({"features": ["a", "a"]}, "features must be"),
        ({"features": []}, "features must be"),
        ({"weights_sha256": "A" * 64}, "weights_sha256 must be"),
        ({"initialisation": {"scheme": "x", "seed": 1, "values": [0.5]}}, "initialisation must be"),
        ({"initialisation": {"checkpoint": "c" * 64}}, "initialisation must be"),  # without its name
        ({"initialisation": {"checkpoint": "C" * 64, "name": "mlp"}}, "initialisation must be"),
        ({"initialisation": {"checkpoint": "c" * 64, "name": "mlp", "seed": 1}}, "initialisation must be"),
        ({"metrics": {"mia": "0.5 (passes)"}}, "metrics must be"),
        ({"preprocessing": [{"columns": ["a"]}]}, "preprocessing must be"),
        ({"finished": "yesterday"}, "finished must be"),
        ({"finished": "٢٠٢٦-12-04T10:00:00Z"}, "finished must be"),
        ({"target": "line\nbreak"}, "target must be"),
    ],
)
def test_fields_are_typed_and_bounded(key, change, message):
    with pytest.raises(tr.RecordInvalid, match=message):
        tr.sign(record(**change), key)


def test_missing_and_unknown_fields_are_named(key):
    r = record(comment="trust me")
    del r["epsilon"]
    with pytest.raises(tr.RecordInvalid, match="missing epsilon; unknown comment"):
        tr.sign(r, key)


def test_the_published_key_form_round_trips(key):
    text = tr.public_key_text(key.public_key())
    assert text.endswith("\n") and len(text.strip()) == 44
    assert tr.key_id(tr.public_key_from_bytes(text.encode())) == tr.key_id(key.public_key())
    with pytest.raises(tr.RecordInvalid, match="32 bytes"):
        tr.public_key_from_bytes(b"QUJD")


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(sorted(tr.FIELDS)), flip=st.integers(0, 10_000))
def test_any_change_to_any_field_is_caught(key, field, flip):
    envelope = tr.sign(record(), key)
    edited = copy.deepcopy(envelope)
    value = edited["record"][field]
    edited["record"][field] = _changed(value, flip)
    assert edited["record"][field] != value
    with pytest.raises(tr.RecordInvalid):
        tr.verify(edited, key.public_key())


def _changed(value, flip: int):
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, int):
        return value + 1 + flip
    if isinstance(value, float):
        return value * (1 + (flip + 1) * 1e-9)
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    if isinstance(value, list):
        return [*value, f"x{flip}"]
    return {**value, f"x{flip}": 1}
