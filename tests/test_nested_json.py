"""JSON nested past the parser's recursion limit, wherever a service reads JSON that someone else wrote: each
refuses it with its own error for a malformed input, not a RecursionError (which no caller expected: the
channel answered ``internal`` and kept the request's descriptors; see tests/test_channel.py)."""

from __future__ import annotations

import json
import os
import struct

import pytest

from paitient.channel import ChannelError
from paitient.rules.egress import FrameError, decode_header
from paitient.services.airlock.weights import WeightsFormatError, parse_safetensors
from paitient.services.data.errors import IngestRefused
from paitient.services.data.fhir import read_ndjson
from paitient.services.launcher.base import check_connection

DEPTH = 100_000
NESTED = b"[" * DEPTH + b"]" * DEPTH


def test_an_egress_frame_header_nested_too_deeply_is_a_frame_error():
    with pytest.raises(FrameError, match="frame header is not JSON"):
        decode_header(NESTED)


def test_a_safetensors_header_nested_too_deeply_is_not_a_weights_file():
    header = b'{"w": ' + NESTED + b"}"
    data = struct.pack("<Q", len(header)) + header
    with pytest.raises(WeightsFormatError, match="the safetensors header is not JSON"):
        parse_safetensors(data)


def test_a_fhir_line_nested_too_deeply_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "patients.ndjson"
    ok = json.dumps({"resourceType": "Patient", "id": "p1"}).encode()
    path.write_bytes(ok + b"\n" + b'{"resourceType": "Patient", "extension": ' + NESTED + b"}\n")
    with pytest.raises(IngestRefused, match=r"patients.ndjson line 2: not a JSON resource \(RecursionError\)"):
        read_ndjson(path, "Patient")


def test_a_connection_file_nested_too_deeply_is_refused(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    path = runtime / "kernel-abc.json"
    path.write_bytes(b'{"transport": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")  # under the file's 64 KiB
    with pytest.raises(ChannelError, match="is not JSON") as e:
        check_connection(str(path), os.getuid(), str(runtime))
    assert e.value.code == "path_refused"
