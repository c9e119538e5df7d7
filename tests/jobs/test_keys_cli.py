"""The runner's signing key on disk, and `paitient jobs verify` on real files."""

import json
import os
import stat
import subprocess
import sys

import pytest

from paitient.config import ConfigError, parse
from paitient.rules import training_record as tr
from paitient.services.jobs import keys
from tests.jobs.test_record import WEIGHTS, record


@pytest.fixture
def site(tmp_path):
    return parse({"workspace": {"state_dir": str(tmp_path / "state")}})


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_is_made_once_root_only_and_its_public_half_published(site):
    key = keys.ensure_signing_key(site)
    private, public = keys.private_key_path(site), keys.public_key_path(site)
    assert (mode(private), mode(private.parent), mode(public)) == (0o600, 0o700, 0o644)
    assert tr.key_id(keys.load_public_key(public)) == tr.key_id(key.public_key())
    again = keys.ensure_signing_key(site)  # never replaced: records signed before still verify
    assert tr.key_id(again.public_key()) == tr.key_id(key.public_key())
    public.write_text("tampered\n")  # the published copy is put right from the private key
    keys.ensure_signing_key(site)
    assert tr.key_id(keys.load_public_key(public)) == tr.key_id(key.public_key())


def test_a_key_others_could_read_is_refused(site):
    keys.ensure_signing_key(site)
    os.chmod(keys.private_key_path(site), 0o640)
    with pytest.raises(ConfigError, match="readable by root only"):
        keys.load_signing_key(site)


def test_a_short_key_is_refused_with_what_to_do(site):
    path = keys.private_key_path(site)
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="holds 5 bytes, not 32; .*restore the site's key"):
        keys.load_signing_key(site)


def verify_cli(site, *args):
    return subprocess.run(
        [sys.executable, "-m", "paitient.cli", "jobs", "verify", f"--state-dir={site.state_dir}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def released(site, tmp_path):
    """A record and weights as a release carries them."""
    key = keys.ensure_signing_key(site)
    rec, weights = tmp_path / "record.json", tmp_path / "model.safetensors"
    rec.write_text(json.dumps(tr.sign(record(), key)))
    weights.write_bytes(WEIGHTS)
    return rec, weights


def test_verify_accepts_a_true_release(site, released):
    rec, weights = released
    out = verify_cli(site, f"--record={rec}", f"--weights={weights}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("verified: record and weights signed by key ") and "epsilon: 0.98" in out.stdout
    # with the published key given explicitly, as someone outside the workspace checks it
    out = verify_cli(site, f"--record={rec}", f"--weights={weights}", f"--public-key={keys.public_key_path(site)}")
    assert out.returncode == 0, out.stderr


def test_verify_refuses_edited_records_and_other_weights(site, released):
    rec, weights = released
    envelope = json.loads(rec.read_text())
    envelope["record"]["epsilon"] = 0.1
    rec.write_text(json.dumps(envelope))
    out = verify_cli(site, f"--record={rec}", f"--weights={weights}")
    assert out.returncode == 1 and "NOT VERIFIED: the signature does not match the record" in out.stdout
    envelope["record"]["epsilon"] = 0.98
    rec.write_text(json.dumps(envelope))
    weights.write_bytes(WEIGHTS + b"trained in the clear")
    out = verify_cli(site, f"--record={rec}", f"--weights={weights}")
    assert out.returncode == 1 and "not the weights the runner trained" in out.stdout


def test_verify_refuses_a_record_file_that_names_a_field_twice(site, released):
    """Attack: other values before the signed ones (``"epsilon": 0.5`` ahead of the signed 0.98). JSON keeps the
    last of two, so the signature held and the file verified; a reader taking the first saw 0.5."""
    rec, weights = released
    text = rec.read_text()
    assert text.count('"record": {') == 1
    rec.write_text(text.replace('"record": {', '"record": {"epsilon": 0.5, '))
    assert json.loads(rec.read_text())["record"]["epsilon"] == 0.98  # what the signature covers
    out = verify_cli(site, f"--record={rec}", f"--weights={weights}")
    assert out.returncode == 1, out.stdout
    assert "NOT VERIFIED" in out.stdout and "names 'epsilon' twice" in out.stdout
    rec.write_text("{not json")
    out = verify_cli(site, f"--record={rec}", f"--weights={weights}")
    assert out.returncode == 1 and "NOT VERIFIED" in out.stdout and "is not JSON" in out.stdout


def test_verify_says_what_is_missing(site, tmp_path):
    out = verify_cli(site)
    assert out.returncode == 2 and "--record=FILE" in out.stderr
    out = verify_cli(site, f"--record={tmp_path / 'r.json'}")
    assert out.returncode == 2 and "no public key at" in out.stderr


def test_verify_a_job_of_this_workspace_by_its_id(site, released):
    rec, weights = released
    out_dir = site.state_dir / "jobs" / "out" / "job-3f2a9c"
    out_dir.mkdir(parents=True)
    (out_dir / "record.json").write_bytes(rec.read_bytes())
    (out_dir / "model.safetensors").write_bytes(weights.read_bytes())
    out = verify_cli(site, "job-3f2a9c")
    assert out.returncode == 0 and out.stdout.startswith("verified: record and weights"), out.stderr
    (out_dir / "model.safetensors").write_bytes(b"other")
    out = verify_cli(site, "job-3f2a9c")
    assert out.returncode == 1 and "not the weights the runner trained" in out.stdout
    out = verify_cli(site, "job-000000")
    assert out.returncode == 2 and "has no published record" in out.stderr
