"""The pods' tokens as the hub keeps them: hashes only, one live token per user, readable by the gateway's
group and changed by root only; and the Secret that carries a token to its pod."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from paitient import podtokens
from paitient.hub.kubernetes import token_secret_manifest


def test_the_file_keeps_hashes_never_tokens(tmp_path):
    path = podtokens.token_file(tmp_path)
    token, who = podtokens.mint(path, "alice", 61001, group=4242)
    text = path.read_text()
    assert token not in text
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert json.loads(text) == {digest: {"user": "alice", "uid": 61001, "pod": who.pod}}
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, os.getuid(), 4242)
    assert podtokens.PodTokens(path).lookup(token) == who


def test_a_new_pod_revokes_the_users_token_before_and_no_other(tmp_path):
    path = podtokens.token_file(tmp_path)
    tokens = podtokens.PodTokens(path)
    first, before = podtokens.mint(path, "alice", 61001)
    bobs, bob = podtokens.mint(path, "bob", 61002)
    second, alice = podtokens.mint(path, "alice", 61001)
    assert tokens.lookup(first) is None and tokens.lookup(second) == alice and tokens.lookup(bobs) == bob
    assert alice.pod != before.pod  # each pod an id of its own: the ledger tells their kernels apart
    assert podtokens.revoke(path, "alice") is True and podtokens.revoke(path, "alice") is False
    assert tokens.lookup(second) is None and tokens.lookup(bobs) == bob


def test_nothing_but_a_minted_token_is_looked_up(tmp_path):
    path = podtokens.token_file(tmp_path)
    tokens = podtokens.PodTokens(path)
    assert tokens.lookup("anything") is None  # no file yet
    token, _ = podtokens.mint(path, "alice", 61001)
    for wrong in (None, "", 42, ["x"], token + "x", token[:-1], "x" * 10_000):
        assert tokens.lookup(wrong) is None, wrong
    # an entry for root (written by hand) stands for nobody
    data = json.loads(path.read_text())
    data[hashlib.sha256(b"root-token").hexdigest()] = {"user": "root", "uid": 0, "pod": "p"}
    path.write_text(json.dumps(data))
    assert tokens.lookup("root-token") is None
    with pytest.raises(ValueError, match="must not be root"):
        podtokens.mint(path, "root", 0)


def test_the_secret_carries_the_token_under_the_key_the_relay_reads():
    body = token_secret_manifest("paitient-pod-token-alice", "tok-123", "paitient")
    assert body["kind"] == "Secret" and body["metadata"]["name"] == "paitient-pod-token-alice"
    assert body["metadata"]["namespace"] == "paitient" and body["stringData"] == {"token": "tok-123"}
