"""Which binary buffers of kernel messages the gate scans as text (the pure rule)."""

import numpy as np
import pandas as pd

from paitient.rules.egress import looks_like_text


def test_a_table_as_bytes_is_text_even_with_stray_bytes():
    csv = pd.DataFrame({"patient": [f"P-{i:04d}" for i in range(50)], "radius": np.arange(50) * 1.5}).to_csv()
    assert looks_like_text(csv.encode())
    assert looks_like_text(csv.encode("utf-16-le")) is False  # every other byte a NUL: not text to this rule
    assert looks_like_text(csv.encode() + b"\xff\xfe" * 10)
    assert looks_like_text("Größe,Gewicht\n1,2\n".encode())


def test_packed_numbers_and_images_are_binary():
    rng = np.random.default_rng(0)
    assert not looks_like_text(rng.random(1000).tobytes())
    assert not looks_like_text((rng.random(1000) * 30).astype("float32").tobytes())
    assert not looks_like_text(np.arange(1000, dtype="int64").tobytes())
    assert not looks_like_text(b"\x89PNG\r\n\x1a\n" + rng.bytes(2000))
    assert not looks_like_text(b"")
