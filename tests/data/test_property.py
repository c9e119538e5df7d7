"""Property: whatever the source holds, no dropped value and no raw identifier reaches the published files."""

import datetime as dt
import secrets
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paitient.config import load
from paitient.services.data import keys
from paitient.services.data.ingest import ingest

from .conftest import make_spec, pseudonyms, write_csv

ID_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
word = st.text("abcdefghijklmnopqrstuvwxyzäöüß", min_size=4, max_size=9).map(str.capitalize)
patient = st.fixed_dictionaries(
    {
        "id": st.text(ID_ALPHABET, min_size=8, max_size=12),
        "name": st.tuples(word, word).map(" ".join),
        "phone": st.integers(10**8, 10**10 - 1).map(lambda n: f"+49 {n}"),
        "email": st.tuples(word, word).map(lambda w: f"{w[0].lower()}.{w[1].lower()}@mail.example"),
        "visits": st.lists(st.dates(dt.date(1990, 1, 1), dt.date(2030, 1, 1)), min_size=1, max_size=4),
        "score": st.floats(-1e6, 1e6, allow_nan=False),
    }
)

COLUMNS = {
    "id": {"action": "pseudonym", "rename": "patient"},
    "name": "drop",
    "phone": "drop",
    "email": "drop",
    "seen": "date_shift",
    "score": "keep",
}


def published_text(folder: Path) -> tuple[bytes, str]:
    """The published bytes, and every value, column name and metadata entry as text."""
    raw = (folder / "data.parquet").read_bytes() + (folder / "manifest.json").read_bytes()
    f = pq.ParquetFile(folder / "data.parquet")
    table = f.read()
    text = [str(v) for col in table.columns for v in col.to_pylist()]
    text += table.column_names + [str(f.metadata.row_group(0).to_dict()) if f.metadata.num_row_groups else ""]
    text += [repr(f.schema_arrow), repr(f.metadata.metadata)]
    return raw, "\n".join(text)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(patient, min_size=1, max_size=12, unique_by=(lambda p: p["id"], lambda p: p["name"])))
def test_no_dropped_value_or_raw_identifier_is_published(patients):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # an accounts prefix per example: each example's site makes its own project groups
        prefix = "t" + secrets.token_hex(2)
        site = load(None, overrides={"workspace": {"state_dir": str(tmp / "state")}, "accounts": {"prefix": prefix}})
        keys.ensure_key(site)
        rows = [
            [p["id"], p["name"], p["phone"], p["email"], v.isoformat(), p["score"]]
            for p in patients
            for v in p["visits"]
        ]
        src = write_csv(tmp / "src.csv", ["id", "name", "phone", "email", "seen", "score"], rows)
        pub = ingest(site, make_spec(src, COLUMNS, patient_id="id"), operator="t")
        raw, text = published_text(pub.path)
        for p in patients:
            for secret in (p["id"], p["name"], p["phone"], p["email"]):
                assert secret.encode() not in raw and secret not in text, secret
        published = pq.read_table(pub.path / "data.parquet").to_pylist()
        assert len(published) == len(rows)
        # rows come in a keyed order, not the source's: each patient's dates, matched by the pseudonym the
        # test derives under the key, all moved by one offset that is not 0
        ids = [p["id"] for p in patients]
        for p, pseudonym in zip(patients, pseudonyms(site, "oncology", ids), strict=True):
            seen = sorted(r["seen"] for r in published if r["patient"] == pseudonym)
            assert len(seen) == len(p["visits"])
            moved = {(s - d).days for s, d in zip(seen, sorted(p["visits"]), strict=True)}
            assert len(moved) == 1 and 0 not in moved
        assert len({r["patient"] for r in published}) == len(patients)
