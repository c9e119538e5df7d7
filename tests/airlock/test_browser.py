"""The review page in the system Chromium: a steward reads the checks and decides; a researcher downloads."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from paitient.rules import review
from paitient.services.airlock.web import make_app
from tests.airlock.helpers import (
    GOOD,
    PREFIX,
    csv_bytes,
    figure_with_payload,
    known_user_auth,
    png_chunks,
    registry_counts,
    submit,
    wait_state,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def served(airlock, people):
    auth = known_user_auth()
    loop = asyncio.new_event_loop()
    sock, port = bind_unused_port()
    ready = threading.Event()
    holder: dict = {}

    def run():
        asyncio.set_event_loop(loop)
        holder["server"] = HTTPServer(make_app(airlock, prefix=PREFIX, hub_auth=auth))
        holder["server"].add_sockets([sock])
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}{PREFIX}"

    async def close():
        holder["server"].stop()
        await holder["server"].close_all_connections()

    asyncio.run_coroutine_threadsafe(close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def _page(browser, base: str, user: str):
    ctx = browser.new_context()
    ctx.add_cookies([{"name": "test-user", "value": user, "url": base}])
    return ctx.new_page()


def test_steward_reviews_and_researcher_downloads_in_the_browser(served, browser, airlock, people):
    hostile = pd.DataFrame({"group": ["<b>bold</b>", "b"], "n": [30, 40]})
    rid = submit(
        airlock, people, "alice", csv_bytes(hostile), name="groups.csv", justification="Table 2 <i>of the paper</i>"
    )
    wait_state(airlock, rid, review.IN_REVIEW)

    # Before release the researcher's page carries nothing of the table, and no preview.
    early = _page(browser, served, "alice")
    early.goto(f"{served}requests/{rid}")
    assert early.locator("#preview-table").count() == 0 and early.locator("#preview-reviewers-only").count() == 1
    assert "<b>bold</b>" not in early.content() and "&lt;b&gt;bold" not in early.content()

    sam = _page(browser, served, "sam")
    sam.goto(served)
    row = sam.locator(f'tr[data-id="{rid}"]')
    assert "awaits your review" in row.inner_text()
    row.get_by_role("link", name=rid).click()
    assert sam.locator("#state").inner_text() == "in review"
    # Markup from the researcher is shown as text, never rendered.
    assert sam.locator("#justification").inner_text() == "Table 2 <i>of the paper</i>"
    assert sam.locator("#preview-table td").first.inner_text() == "<b>bold</b>"
    assert sam.locator("#preview-table b").count() == 0
    assert sam.locator('#checks tr[data-check="minimum_count"] td').nth(1).inner_text() == "pass"
    # The browser enforces "a comment is required" before anything is sent ...
    sam.get_by_role("radio", name="Approve").check()
    sam.get_by_role("button", name="Record decision").click()
    assert sam.locator("#comment").evaluate("el => el.validity.valueMissing") is True
    assert airlock.store.get(rid).state == "in_review"
    # ... and a decision with a comment goes through with the XSRF token the page carries (the markup label
    # is free text, which fails the label check: approving it is an override with its reason).
    assert "labels" in sam.locator("#failed-checks").inner_text()
    sam.fill("#override", "the label is a heading the paper prints")
    sam.fill("#comment", "aggregate counts, all cells above 10")
    sam.get_by_role("button", name="Record decision").click()
    sam.wait_for_url(f"{served}requests/{rid}")
    assert sam.locator("#state").inner_text() == "released"
    assert "aggregate counts, all cells above 10" in sam.locator("#decisions").inner_text()
    assert sam.locator("#download").count() == 0  # the steward is not a project member

    alice = _page(browser, served, "alice")
    alice.goto(f"{served}requests/{rid}")
    with alice.expect_download() as dl:
        alice.locator("#download").click()
    download = dl.value
    assert download.suggested_filename == "groups.csv"
    assert open(download.path(), "rb").read() == csv_bytes(hostile)
    assert [e.actor for e in airlock.store.events(rid, "download")] == ["alice"]


def test_a_figure_wider_than_the_page_is_shown_at_full_size_not_shrunk(served, browser, airlock, people):
    """A figure was shown shrunk to the page's width, which hid a block of data in its corner; it is now shown
    one pixel of the figure to one of the page, in a frame that scrolls."""
    pixels = np.full((1200, 1900, 3), 255, np.uint8)
    pixels[-300:, -160:] = np.random.default_rng(3).integers(0, 2, (300, 160, 1), np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    rid = submit(airlock, people, "alice", buf.getvalue(), kind="figure", name="bars.png")
    wait_state(airlock, rid, review.IN_REVIEW)
    sam = _page(browser, served, "sam")
    sam.set_viewport_size({"width": 1024, "height": 768})
    sam.goto(f"{served}requests/{rid}")
    image = sam.locator("#preview-image")
    image.wait_for()
    shown = image.evaluate("el => el.complete && [el.naturalWidth, el.naturalHeight, el.width, el.height]")
    assert shown == [1900, 1200, 1900, 1200]
    frame = sam.locator("div.figure-frame")
    assert frame.evaluate("el => el.scrollWidth > el.clientWidth && el.scrollHeight > el.clientHeight")
    assert "one pixel of the figure to one of the page; scroll to see all of it" in (
        sam.locator("#preview-scale").inner_text()
    )


def test_own_request_has_no_decision_form_in_the_browser(served, browser, airlock, people):
    rid = submit(airlock, people, "steph", GOOD, project="oncology")
    wait_state(airlock, rid, review.IN_REVIEW)
    steph = _page(browser, served, "steph")
    steph.goto(f"{served}requests/{rid}")
    assert "another steward of the project must review it" in steph.locator("#own-request").inner_text()
    assert steph.locator("#decision-form").count() == 0
    bob = _page(browser, served, "bob")
    response = bob.goto(f"{served}requests/{rid}")
    assert response.status == 403
    assert "not yours" in bob.locator("#error-message").inner_text()


def test_the_steward_sees_the_reencoded_figure_in_the_browser(served, browser, airlock, people):
    original, upload = figure_with_payload()
    rid = submit(airlock, people, "alice", upload, kind="figure", name="km.png")
    wait_state(airlock, rid, review.IN_REVIEW)
    sam = _page(browser, served, "sam")
    with sam.expect_response(lambda r: r.url.endswith(f"requests/{rid}/preview")) as shown:
        sam.goto(f"{served}requests/{rid}")
    assert shown.value.status == 200 and png_chunks(shown.value.body())[1] == b""
    image = sam.locator("#preview-image")
    image.wait_for()
    assert image.evaluate("el => el.complete && [el.naturalWidth, el.naturalHeight]") == list(original.size)
    assert "Shown at full size: 64x48 pixels" in sam.locator("#preview-scale").inner_text()
    assert "bytes after the end of the image" in sam.locator("#preview-beyond").inner_text()
    alice = _page(browser, served, "alice")
    alice.goto(f"{served}requests/{rid}")
    assert alice.locator("#preview-image").count() == 0
    response = alice.goto(f"{served}requests/{rid}/preview")
    assert response.status == 403
    assert "reviewers only" in alice.locator("#error-message").inner_text()


def test_an_override_in_the_browser_needs_a_reason_and_stands_out_in_the_list(served, browser, airlock, people):
    rid = submit(airlock, people, "alice", csv_bytes(pd.DataFrame({"x": ["a", "b"], "n": [3, 40]})), name="s.csv")
    wait_state(airlock, rid, review.IN_REVIEW)
    sam = _page(browser, served, "sam")
    sam.goto(f"{served}requests/{rid}")
    assert "minimum_count" in sam.locator("#failed-checks").inner_text()
    sam.get_by_role("radio", name="Approve").check()
    sam.fill("#comment", "small cell is fine")
    sam.get_by_role("button", name="Record decision").click()
    # without a reason the airlock refuses, and says what it needs
    assert "approving needs an override reason" in sam.content()
    assert airlock.store.get(rid).state == "in_review"
    sam.goto(f"{served}requests/{rid}")
    sam.get_by_role("radio", name="Approve").check()
    sam.fill("#comment", "small cell is fine")
    sam.fill("#override", "the cell of 3 counts sites, not patients")
    sam.get_by_role("button", name="Record decision").click()
    sam.wait_for_url(f"{served}requests/{rid}")
    assert sam.locator("#state").inner_text() == "released"
    assert "the cell of 3 counts sites, not patients" in sam.locator("#decisions").inner_text()
    sam.goto(served)
    assert sam.locator(f'tr[data-id="{rid}"] .override').inner_text() == "override"


def test_a_steward_sees_a_differencing_failure_beside_the_earlier_release(served, browser, airlock, people, site):
    """Two count tables of the same bands, everyone and everyone under 90: each alone passes, their difference
    counts the two over-90s. The steward's page puts the new table beside the released one with the cell the
    difference is taken from highlighted; the researcher's page carries none of it."""
    df = registry_counts(site)
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    everyone = df.groupby("age_band").size().rename("n").reset_index()
    first = submit(airlock, people, "ren", csv_bytes(everyone), recipe=recipe)
    wait_state(airlock, first, review.RELEASED)
    young = df[df.age < 90].groupby("age_band").size().rename("n").reset_index()
    second = submit(airlock, people, "ren", csv_bytes(young), recipe={**recipe, "filter": {"age": {"<": 90}}})
    wait_state(airlock, second, review.IN_REVIEW)

    sam = _page(browser, served, "sam")
    sam.goto(f"{served}requests/{second}")
    comparison = sam.locator(f'#differences .comparison[data-earlier="{first}"]')
    assert comparison.count() == 1
    assert f"request {first} (released)" in comparison.locator("h3").inner_text()
    rows = [[td.inner_text() for td in tr.locator("td").all()] for tr in comparison.locator("tbody tr").all()]
    assert rows == [
        ["everyone", "282", "280", "-2"],  # the totals, compared too
        ["age_band = 0-44", "100", "100", "+0"],
        ["age_band = 45-64", "80", "80", "+0"],
        ["age_band = 65+", "102", "100", "-2"],
    ]
    flagged = comparison.locator("tbody tr.flagged")
    assert [f.locator("td").first.inner_text() for f in flagged.all()] == ["everyone", "age_band = 65+"]
    # the highlight is drawn, not only named in the markup
    color = flagged.last.locator("td").first.evaluate("el => getComputedStyle(el).backgroundColor")
    plain = (
        comparison.locator("tbody tr").nth(1).locator("td").first.evaluate("el => getComputedStyle(el).backgroundColor")
    )
    assert color != plain
    finding = comparison.locator(".findings li").all_inner_texts()
    assert any("nested populations" in f and "age_band = 65+ counts 2 people" in f and "exact" in f for f in finding)
    assert any("everyone counts 2 people" in f for f in finding)
    # the link leads to the earlier release's own page
    comparison.get_by_role("link", name=f"request {first}").click()
    sam.wait_for_url(f"{served}requests/{first}")
    assert sam.locator("#differences").count() == 0  # the first table differenced with nothing

    ren = _page(browser, served, "ren")
    ren.goto(f"{served}requests/{second}")
    assert ren.locator('#checks tr[data-check="differencing"] td').nth(1).inner_text() == "fail"
    assert ren.locator("#differences").count() == 0
    assert "65+" not in ren.content() and "102" not in ren.content()
