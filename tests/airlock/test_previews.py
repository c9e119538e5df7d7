"""The airlock's pages leak nothing: previews for reviewers only, from the canonical form, each one recorded.

Every attack is tried through the real pages (tornado, the hub's OAuth client, the real store and audit trail)
and the specific refusal is asserted.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import time

import pandas as pd
import pytest
from PIL import Image
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from paitient.channel import ChannelError
from paitient.rules import review
from paitient.rules.records import AuditError
from paitient.services.airlock import views
from paitient.services.airlock.images import shown_pixels
from paitient.services.airlock.service import Airlock, AirlockSettings
from paitient.services.airlock.web import make_app
from paitient.services.audit import emit, trail_dir
from paitient.services.audit.query import newest_first
from tests.airlock.helpers import (
    GOOD,
    PREFIX,
    RESEARCHER,
    SECRET,
    STEWARD,
    Client,
    csv_bytes,
    figure_with_payload,
    known_user_auth,
    png_chunks,
    submit,
    wait_state,
)

# A pending table whose every cell and column name is unmistakable in a page.
CELLS = pd.DataFrame({"ward_Zq": ["Kestrel-9", "Osprey-4", "Merlin-2"], "count_Zq": [120, 48, 7]})
CELL_TEXTS = ("ward_Zq", "count_Zq", "Kestrel-9", "Osprey-4", "Merlin-2")
LONG = " ".join(["counts by ward"] * 100)


def trail(airlock, action: str) -> list[dict]:
    return [r for r in newest_first(trail_dir(airlock.site)) if r["action"] == action]


async def test_a_csv_behind_a_png_header_is_refused_at_the_request(web, airlock, people):
    upload = b"\x89PNG\r\n\x1a\n" + csv_bytes(CELLS)
    before = len(list(airlock.store.blobs.rglob("*")))
    with pytest.raises(ChannelError, match="not a figure the airlock releases: it does not decode as a PNG") as e:
        submit(airlock, people, "alice", upload, kind="figure", name="figure.png")
    assert e.value.code == "refused" and "plt.savefig('figure.png')" in str(e.value)
    # Nothing of it is stored, so there is nothing to preview or release; the refusal is recorded.
    assert airlock.store.list(username="alice") == []
    assert len(list(airlock.store.blobs.rglob("*"))) == before
    denied = trail(airlock, "airlock.request")[0]
    assert (denied["actor"], denied["outcome"], denied["details"]["kind"]) == ("alice", "denied", "figure")
    assert "does not decode as a PNG, JPEG or GIF image" in denied["details"]["reason"]
    assert "Kestrel-9" not in json.dumps(denied)


async def test_the_steward_gets_the_pixels_without_metadata_or_trailing_bytes(web, airlock, people):
    original, upload = figure_with_payload()
    rid = submit(airlock, people, "alice", upload, kind="figure", name="km.png")
    wait_state(airlock, rid, review.IN_REVIEW)
    r = await web.fetch("sam", f"requests/{rid}/preview")
    assert r.code == 200 and r.headers["Content-Type"] == "image/png" and r.body != upload
    kinds, trailing = png_chunks(r.body)
    assert set(kinds) == {b"IHDR", b"IDAT", b"IEND"} and trailing == b""
    assert SECRET.encode() not in r.body and b"age,sex" not in r.body
    assert Image.open(io.BytesIO(r.body)).tobytes() == shown_pixels(original).tobytes()
    assert r.headers["X-Preview-SHA256"] == hashlib.sha256(r.body).hexdigest()
    # The page tells the steward what the file carries besides the pixels, without quoting it.
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    assert 'id="preview-beyond"' in page and "1 tEXt block" in page and "bytes after the end of the image" in page
    assert SECRET not in page
    # Recorded: who, which request, the canonical bytes' hash and size.
    shown = {r["details"]["via"]: r for r in trail(airlock, "airlock.preview") if r["outcome"] == "ok"}
    assert shown["image"]["actor"] == "sam" and shown["image"]["object"] == rid
    assert shown["image"]["details"]["sha256"] == hashlib.sha256(r.body).hexdigest()
    assert shown["image"]["details"]["size"] == len(r.body)
    assert shown["image"]["details"]["upload_sha256"] == hashlib.sha256(upload).hexdigest()
    assert (
        shown["image"]["details"]["file_sha256"] == airlock.store.get(rid).sha256 == hashlib.sha256(r.body).hexdigest()
    )
    assert shown["page"]["details"]["sha256"] == shown["image"]["details"]["sha256"]


async def test_a_pending_table_reaches_the_stewards_page_only(web, airlock, people):
    rid = submit(airlock, people, "alice", csv_bytes(CELLS), name="wards.csv", justification=LONG)
    wait_state(airlock, rid, review.IN_REVIEW)
    # The requester's page and API: state, checks, decisions; none of the table's cells or column names.
    own = await web.fetch("alice", f"requests/{rid}")
    assert own.code == 200
    text = own.body.decode()
    assert "in review" in text and 'data-check="minimum_count"' in text
    for cell in CELL_TEXTS:
        assert cell not in text, cell
    assert 'id="preview-table"' not in text and "&quot;value&quot;" not in text
    # The justification and the file's name came from the kernel: the requester's browser gets neither.
    assert "counts by ward" not in text and "wards.csv" not in text
    assert len(LONG) == 1499 and "(about 1500 characters; the reviewers read all of it" in text
    # Nor the file's hash (a few bits of the kernel's choice by grinding), its exact size or exact times.
    req = airlock.store.get(rid)
    assert req.sha256 not in text and req.sha256[:16] not in text
    assert f"{views.UNHASHED}</code>" in html.unescape(text)
    history = re.findall(r"<li>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", text)
    assert len(history) >= 3 and all(t.endswith(":00") for t in history), history
    assert history[0] == time.strftime("%Y-%m-%d %H:%M:00", time.gmtime(req.created))
    api = (await web.fetch("alice", f"api/requests/{rid}")).body.decode()
    for cell in (*CELL_TEXTS, "counts by ward", "wards.csv", req.sha256):
        assert cell not in api, cell
    answer = json.loads(api)
    assert answer["justification"].startswith("(about 1500 characters; the reviewers read all of it")
    assert answer["sha256"] == views.UNHASHED and answer["size"] == views.rounded_size(req.size)
    assert answer["created"] == req.created // 60 * 60 and answer["updated"] % 60 == 0
    listing = (await web.fetch("alice", "api/requests")).body.decode()
    assert "counts by ward" not in listing and "wards.csv" not in listing and req.sha256 not in listing
    entry = json.loads(listing)["requests"][0]
    assert entry["filename"] == views.UNNAMED and entry["sha256"] == views.UNHASHED
    assert entry["created"] % 60 == 0 and entry["updated"] % 60 == 0
    assert trail(airlock, "airlock.preview") == []  # the requester's page renders no preview

    # The steward's page: the parsed cells, the small one marked, the whole justification.
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    for cell in CELL_TEXTS:
        assert cell in page, cell
    assert '<td class="flagged" title="fails a disclosure check">7</td>' in page
    assert LONG in page
    record = trail(airlock, "airlock.preview")[0]
    canonical = airlock.previews.canonical(airlock.store.get(rid))
    assert (record["actor"], record["outcome"], record["object"]) == ("sam", "ok", rid)
    assert record["details"] == {
        "project": "oncology",
        "user": "alice",
        "via": "page",
        "kind": "table",
        "sha256": hashlib.sha256(canonical.data).hexdigest(),
        "size": len(canonical.data),
        "file_sha256": airlock.store.get(rid).sha256,  # the stored file, re-written from the cells ...
        "upload_sha256": hashlib.sha256(csv_bytes(CELLS)).hexdigest(),  # ... the same bytes for a plain CSV
    }
    assert airlock.store.get(rid).sha256 == hashlib.sha256(csv_bytes(CELLS)).hexdigest()
    assert json.loads(canonical.data)["rows"] == [["Kestrel-9", "120"], ["Osprey-4", "48"], ["Merlin-2", "7"]]
    # A table has no image preview.
    r = await web.fetch("sam", f"requests/{rid}/preview")
    assert r.code == 404 and b"this request&#x27;s preview is table" in r.body
    # The JSON API gives the steward the checks' details (they quote cells) and the whole justification: a
    # read of the upload's content, recorded as a page's is (before, it wrote no record at all).
    api = json.loads((await web.fetch("sam", f"api/requests/{rid}")).body)
    assert api["justification"] == LONG
    read = [r for r in trail(airlock, "airlock.preview") if r["details"]["via"] == "api"]
    assert [(r["actor"], r["outcome"], r["object"]) for r in read] == [("sam", "ok", rid)]
    assert read[0]["details"] == {
        "project": "oncology",
        "user": "alice",
        "via": "api",
        "file_sha256": airlock.store.get(rid).sha256,
    }


async def test_what_the_kernel_wrote_into_a_request_reaches_no_browser_but_a_reviewers(web, airlock, people):
    """A kernel files a request whose justification, file name and recipe carry rows: the reason of the recipe
    check quotes the recipe's keys. None of it reaches the requester's or a colleague's browser, before or
    after release (but the released file's name); the steward reads all of it."""
    row = "PATIENT-Zq7 87 F HIV+"
    recipe = {"dataset": "breast_cancer", "index": ["stage"], row: 1}
    rid = submit(airlock, people, "alice", GOOD, name=f"{row}.csv", justification=f"{row}; " * 40, recipe=recipe)
    wait_state(airlock, rid, review.IN_REVIEW)
    steward = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    # The name is released as the steward reads it: "+" is not a character a released name holds.
    assert "unknown recipe keys" in steward and html.escape("PATIENT-Zq7 87 F HIV_.csv") in steward
    assert html.escape(f"{row}; " * 40).strip() in steward

    async def browsers(*users: str) -> dict[str, str]:
        pages = {}
        for user in users:
            for path in ("", "api/requests", f"requests/{rid}", f"api/requests/{rid}"):
                r = await web.fetch(user, path)
                assert r.code == 200, (user, path, r.code)
                pages[f"{user} {path}"] = r.body.decode()
        return pages

    for where, text in (await browsers("alice")).items():
        assert "Zq7" not in text and "unknown recipe keys" not in text, where
    own = json.loads((await web.fetch("alice", f"api/requests/{rid}")).body)
    by = {c["check"]: c for c in own["checks"]}
    assert by["recipe"] == {
        "check": "recipe",
        "status": "fail",
        "reason": "the table's recipe recomputes exactly its numbers from the dataset: failed; "
        "airlock.status(id) in your notebook says why",
        "details": {},
    }
    assert len(row) * 40 + 80 - 1 == 919
    assert own["filename"] == views.UNNAMED and own["justification"].startswith("(about 920 characters;")
    # In the notebook the researcher gets every word back (the kernel wrote them).
    notebook = airlock.describe(airlock.store.get(rid), for_steward=False)
    assert any("unknown recipe keys" in c["reason"] for c in notebook["checks"])

    why = "the recipe's extra key is a typo; the counts are the ones it recomputes"
    r = await web.decide_with("sam", rid, action="approve", comment="counts fine", override=why)
    assert r.code == 303 and airlock.store.get(rid).state == review.RELEASED
    for where, text in (await browsers("alice", "carol")).items():
        assert "unknown recipe keys" not in text and f"{row}; " not in text, where
        if where.endswith(rid):  # the released file's name, as the steward released it
            assert "Zq7" in text, where


async def test_a_steward_reads_no_earlier_table_of_their_own_beside_a_colleagues(web, airlock, people):
    """steph stewards oncology and works in it. Her kernel files a count table whose counts carry digits of its
    choosing; a colleague's table differs from it by a small group, so the colleague's request page would show
    it side by side. steph reviewing the colleague's request does not get her own table's cells back, nor the
    differences with them, which the check's details listed (``"count": 2.0``: 1982 on the page plus 2 is
    her 1984), on the page or through the JSON API; sam does."""
    stages = ["I", "II", "III", "IV"]
    mine = csv_bytes(pd.DataFrame({"stage": stages, "n": [1984, 719, 4242, 5151]}))
    own = submit(airlock, people, "steph", mine, project="oncology")
    wait_state(airlock, own, review.IN_REVIEW)
    theirs = submit(airlock, people, "alice", csv_bytes(pd.DataFrame({"stage": stages, "n": [1982, 719, 4242, 5151]})))
    wait_state(airlock, theirs, review.IN_REVIEW)
    checks = {c["check"]: c for c in airlock.store.checks(theirs)}
    assert own in checks["differencing"]["details"]["earlier"]
    sam = (await web.fetch("sam", f"requests/{theirs}")).body.decode()
    assert 'id="differences"' in sam and "<td>1984</td>" in sam and 'id="differences-own"' not in sam
    assert "&quot;count&quot;: 2.0" in sam  # the difference, in the check's details
    steph = (await web.fetch("steph", f"requests/{theirs}")).body.decode()
    assert 'id="differences-own"' in steph and own in steph and "1984" not in steph
    assert "&quot;count&quot;" not in steph and "difference(s) with tables you filed" in steph
    api = json.loads((await web.fetch("steph", f"api/requests/{theirs}")).body)
    details = {c["check"]: c for c in api["checks"]}["differencing"]["details"]
    assert details["findings"] == [] and details["own"] == [own] and own not in details["earlier"]


async def test_a_steward_sees_no_preview_of_their_own_request(web, airlock, people):
    rid = submit(airlock, people, "steph", csv_bytes(CELLS), project="oncology")
    wait_state(airlock, rid, review.IN_REVIEW)
    page = (await web.fetch("steph", f"requests/{rid}")).body.decode()
    assert 'id="own-request"' in page and 'id="preview-reviewers-only"' in page
    assert all(cell not in page for cell in CELL_TEXTS)
    r = await web.fetch("steph", f"requests/{rid}/preview")
    assert r.code == 403 and b"previews are for the project&#x27;s reviewers only" in r.body


async def test_an_admin_with_the_review_scope_previews_but_does_not_decide(web, airlock, people):
    rid = submit(airlock, people, "bob", csv_bytes(CELLS))  # cardio: ada is no steward of it
    wait_state(airlock, rid, review.IN_REVIEW)
    assert f'data-id="{rid}"' in (await web.fetch("ada", "")).body.decode()
    page = (await web.fetch("ada", f"requests/{rid}")).body.decode()
    assert "Kestrel-9" in page and 'id="decision-form"' not in page
    # rita is a steward of no project: neither the page nor a preview.
    assert (await web.fetch("rita", f"requests/{rid}")).code == 403
    assert (await web.fetch("rita", f"requests/{rid}/preview")).code == 403


async def test_a_rejected_upload_is_never_downloaded(web, airlock, people):
    rid = submit(airlock, people, "alice", csv_bytes(CELLS))
    wait_state(airlock, rid, review.IN_REVIEW)
    assert (await web.decide("sam", rid, "reject", "row-level wards")).code == 303
    r = await web.fetch("alice", f"requests/{rid}/download")
    assert r.code == 403 and b"request " + rid.encode() + b" is rejected, not released" in r.body
    assert b"Kestrel-9" not in r.body
    page = (await web.fetch("alice", f"requests/{rid}")).body.decode()
    assert 'id="download"' not in page and "row-level wards" in page and "Kestrel-9" not in page
    denied = trail(airlock, "airlock.download")[0]
    assert (denied["actor"], denied["outcome"]) == ("alice", "denied")
    assert airlock.store.events(rid, "download") == []


async def test_a_download_is_recorded_with_hash_and_size(web, airlock, people):
    rid = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, rid, review.IN_REVIEW)
    assert (await web.decide("sam", rid, "approve", "counts above 10")).code == 303
    r = await web.fetch("alice", f"requests/{rid}/download")
    assert r.code == 200 and r.body == GOOD
    record = trail(airlock, "airlock.download")[0]
    assert (record["actor"], record["outcome"], record["object"]) == ("alice", "ok", rid)
    assert record["details"]["sha256"] == hashlib.sha256(GOOD).hexdigest() and record["details"]["size"] == len(GOOD)


class DiskFull:
    """The real audit trail, except that preview records cannot be written (a full disk, say)."""

    def __init__(self, site):
        self.site = site

    def __call__(self, *, actor, action, object, outcome, details):
        if action == "airlock.preview":
            raise AuditError("the audit trail cannot be written: disk full")
        return emit(self.site, actor=actor, action=action, object=object, outcome=outcome, details=details)


@pytest.fixture
async def web_without_trail(site, people):
    airlock = Airlock(site, settings=AirlockSettings(), emit=DiskFull(site))
    airlock.start()
    server = HTTPServer(make_app(airlock, prefix=PREFIX, hub_auth=known_user_auth()))
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    yield airlock, Client(f"http://127.0.0.1:{port}")
    server.stop()
    await server.close_all_connections()
    airlock.stop()


async def test_no_audit_record_no_preview(web_without_trail, people):
    airlock, web = web_without_trail
    table = submit(airlock, people, "alice", csv_bytes(CELLS))
    _, upload = figure_with_payload()
    figure = submit(airlock, people, "alice", upload, kind="figure", name="km.png")
    wait_state(airlock, table, review.IN_REVIEW)
    wait_state(airlock, figure, review.IN_REVIEW)
    page = (await web.fetch("sam", f"requests/{table}")).body.decode()
    # Nothing of the upload is shown without its record: no cells, and the checks as the requester sees them.
    assert "the preview could not be recorded in the audit trail, so it is not shown" in page
    assert all(cell not in page for cell in CELL_TEXTS) and "every count is at least" in page
    assert "&quot;cells_count&quot;" not in page and "1 cell(s) count fewer" not in page
    r = await web.fetch("sam", f"requests/{figure}/preview")
    assert r.code == 503 and b"the preview could not be recorded in the audit trail, so it is not shown" in r.body
    assert not r.body.startswith(b"\x89PNG")
    # Nor through the JSON API, which gave the checks' details and the whole justification without a record.
    api = (await web.fetch("sam", f"api/requests/{table}")).body.decode()
    assert all(cell not in api for cell in CELL_TEXTS) and "cells_count" not in api
    assert "the request's details could not be recorded in the audit trail" in json.loads(api)["unrecorded"]


async def test_a_table_longer_than_a_page_is_approved_only_once_every_page_was_read(web, airlock, people):
    """450 rows of numbers near the data's (no patient row to the index): the steward's preview shows them
    200 at a time; approving before every page was opened is refused naming the unread pages, each page
    shown is audited with where it starts, and after the last page the approval goes through."""
    values = [f"{1000 + 7 * i}.{i % 10}" for i in range(450)]
    upload = ("band,value\n" + "".join(f"b{i},{v}\n" for i, v in enumerate(values))).encode()
    rid = submit(airlock, people, "alice", upload, name="long.csv")
    wait_state(airlock, rid, review.IN_REVIEW)
    why = "the values are model scores over bands, checked against the protocol"
    first = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    assert "Rows 1–200 of 450, columns 1–2 of 2" in first and values[199] in first and values[200] not in first
    assert "you have not opened 2 of them yet" in first and first.count("(not read)") == 2
    r = await web.decide_with("sam", rid, action="approve", comment="fine", override=why)
    assert r.code == 409
    assert "you have not opened 2 of them (rows 201-400, columns 1-2; rows 401-450, columns 1-2)" in html.unescape(
        r.body.decode()
    )
    assert airlock.store.get(rid).state == review.IN_REVIEW
    refused = trail(airlock, "airlock.decision")[0]
    assert refused["outcome"] == "denied" and "read every page first" in refused["details"]["reason"]

    # Not a page: where none starts, or not a number.
    odd = (await web.fetch("sam", f"requests/{rid}?rows=100")).body.decode()
    assert 'id="no-preview"' in odd and "there is no page at row 101, column 1" in odd
    assert (await web.fetch("sam", f"requests/{rid}?rows=-200")).code == 400
    last = (await web.fetch("sam", f"requests/{rid}?rows=400&columns=0")).body.decode()
    assert "Rows 401–450 of 450" in last and values[449] in last and values[0] not in last
    # Another reviewer's reading does not count for sam, nor sam's for another.
    assert (await web.fetch("steph", f"requests/{rid}?rows=200")).code == 200
    r = await web.decide_with("sam", rid, action="approve", comment="fine", override=why)
    assert r.code == 409 and "rows 201-400, columns 1-2)" in html.unescape(r.body.decode())
    middle = (await web.fetch("sam", f"requests/{rid}?rows=200")).body.decode()
    assert values[200] in middle and "you have read them all" in middle
    pages = [
        (p["actor"], p["details"]["page"]) for p in reversed(trail(airlock, "airlock.preview")) if p["outcome"] == "ok"
    ]
    assert ("sam", {"first_row": 400, "first_column": 0, "pages": 3}) in pages
    assert ("steph", {"first_row": 200, "first_column": 0, "pages": 3}) in pages
    r = await web.decide_with("sam", rid, action="approve", comment="fine", override=why)
    assert r.code == 303 and airlock.store.get(rid).state == review.RELEASED


async def test_a_table_no_reviewer_can_read_is_not_approved_and_its_shape_reaches_no_requester(
    web, airlock, people, monkeypatch
):
    """A table too large for a preview cannot be read, so cannot be approved; a steward who filed a long
    table learns nothing of its shape by trying to approve it; and the requester's page says neither which
    pages a steward read nor, by a missing 'about', whether the size is round."""
    from paitient.services.airlock import canonical, previews

    values = "".join(f"b{i},{1000 + i}.5\n" for i in range(450))
    rid = submit(airlock, people, "steph", f"band,value\n{values}".encode(), name="long.csv", project="oncology")
    wait_state(airlock, rid, review.IN_REVIEW)
    with pytest.raises(review.TransitionError) as own:
        airlock.decide(rid, username="steph", scopes={*STEWARD, *RESEARCHER}, action="approve", comment="mine")
    assert "450" not in str(own.value) and "pages" not in str(own.value) and own.value.status == 403
    for start in (0, 200, 400):
        assert (await web.fetch("sam", f"requests/{rid}?rows={start}")).code == 200
    mine = (await web.fetch("steph", f"requests/{rid}")).body.decode()
    assert "preview of the page" not in mine and ": preview" not in mine and "sam" not in mine
    assert re.search(r"\(about \d+ bytes\)", mine)

    monkeypatch.setattr(canonical, "PREVIEW_MAX_SOURCE_BYTES", 5000)
    monkeypatch.setattr(previews, "PREVIEW_MAX_SOURCE_BYTES", 5000)
    big = submit(airlock, people, "alice", f"band,count\n{values}".encode(), name="big.csv")
    wait_state(airlock, big, review.IN_REVIEW)
    page = (await web.fetch("sam", f"requests/{big}")).body.decode()
    assert 'id="no-preview"' in page and "more than the 5000 a preview parses" in page
    r = await web.decide_with("sam", big, action="approve", comment="fine", override="reviewed from the checks only")
    assert r.code == 409 and "no reviewer can read this output" in html.unescape(r.body.decode())
    assert airlock.store.get(big).state == review.IN_REVIEW
    # Returning it stays possible.
    r = await web.decide_with("sam", big, action="return", comment="send a shorter table")
    assert r.code == 303 and airlock.store.get(big).state == review.RETURNED
