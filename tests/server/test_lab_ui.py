"""A researcher's first minutes in the locked-down JupyterLab, in the system Chromium."""

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.labpage import run_cell, wait_for_kernel
from tests.server.harness import UserServer, make_site, publish

pytestmark = pytest.mark.browser


@contextlib.contextmanager
def new_notebook(server: UserServer, before: Callable[[Any], object] | None = None) -> Iterator[Any]:
    """The system Chromium on ``server``'s JupyterLab, a new notebook opened from the launcher; ``before`` is
    given the page before it loads (to listen to its console)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            if before is not None:
                before(page)
            page.goto(f"{server.url}/lab?token={server.token}", timeout=60_000)
            page.click(".jp-LauncherCard[title*='Python 3 (sandbox)']", timeout=60_000)
            yield page
        finally:
            browser.close()


def listen(failures: list[str]) -> Callable[[Any], object]:
    """Keep the console messages about plugins that failed to activate."""
    return lambda page: page.on("console", lambda m: failures.append(m.text) if "activat" in m.text else None)


def test_new_notebook_reads_a_dataset_and_no_plugin_fails(world_tmp, make_system_user):
    """And JupyterLab subscribes to the server's event stream once (it subscribed again, backing off to
    every 30 s, for as long as the stream was refused)."""
    site = make_site(world_tmp, {"onc": ["bc"]})
    publish(site, "onc", "bc", "tumour,size\nA,2.5\n")
    user = make_system_user("ui")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        failures: list[str] = []
        sockets: list[str] = []

        def before(page: Any) -> None:
            listen(failures)(page)
            page.on("websocket", lambda socket: sockets.append(socket.url))

        loaded = time.monotonic()
        with new_notebook(server, before) as page:
            wait_for_kernel(page)
            cell = run_cell(
                page, "import pandas as pd; pd.read_csv('/data/onc/bc/data.csv')", ".jp-OutputArea-output table"
            )
            table = cell.locator(".jp-OutputArea-output table").first
            assert "tumour" in table.inner_text() and "2.5" in table.inner_text()
            assert failures == []
            # a refused subscription is retried after about 1, then 2.5 and 6 s
            page.wait_for_timeout(max(0.0, loaded + 10 - time.monotonic()) * 1000)
            assert [url for url in sockets if "/api/events/subscribe" in url] == [
                server.url.replace("http://", "ws://", 1) + "/api/events/subscribe"
            ]


def test_a_notebook_with_head_and_a_plot_is_saved_and_reopened(world_tmp, make_system_user):
    """Through the egress gate, with the site's egress service and the dataset's row index: the table of
    df.head() and a plot show, the notebook saves, and after a reload Lab opens it again with both outputs."""
    site = make_site(world_tmp, {"onc": ["bc"]})
    rows = "\n".join(f"{i},{10 + i * 0.731:.3f},{20 + i * 1.377:.3f},{i * 3.113:.3f}" for i in range(60))
    publish(site, "onc", "bc", "id,size,weight,score\n" + rows + "\n")
    user = make_system_user("ui")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        with new_notebook(server) as page:
            wait_for_kernel(page)
            run_cell(
                page,
                "import pandas as pd; df = pd.read_csv('/data/onc/bc/data.csv'); df.head()",
                ".jp-OutputArea-output table",
            )
            run_cell(
                page,
                "import matplotlib.pyplot as plt; plt.plot(df['size'], df['score']); plt.show()",
                ".jp-OutputArea-output img",
            )
            page.locator(".jp-Notebook .jp-Cell .cm-content").last.click()
            page.keyboard.press("Control+s")
            # JupyterLab offers to rename an untitled notebook on its first save: keep the name
            try:
                page.wait_for_selector(".jp-Dialog", timeout=5_000)
                page.keyboard.press("Enter")
            except Exception:  # noqa: BLE001, S110 - no dialog: the save went through as it is
                pass
            saved, r = None, None
            for _ in range(60):
                # the server writes a notebook in place: a read in the middle of a save sees part of it, which is
                # no notebook (and is served as text, after the same checks); the next read sees the whole
                r = server.get("/api/contents/Untitled.ipynb?content=1")
                model = r.json() if r.status_code == 200 else {}
                cells = model["content"]["cells"] if model.get("type") == "notebook" else []
                if sum(len(c.get("outputs", [])) for c in cells):
                    saved = model["content"]
                    break
                page.wait_for_timeout(500)
            last = r and (r.status_code, r.text[:600])
            assert saved is not None, ("the notebook was not saved with its outputs", last)
            kinds = {k for c in saved["cells"] for o in c.get("outputs", []) for k in o.get("data", {})}
            assert {"text/html", "image/png"} <= kinds, kinds
            page.reload()
            page.wait_for_selector(".jp-Notebook .jp-OutputArea-output table", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-OutputArea-output img", timeout=30_000)
            assert "withheld" not in page.locator(".jp-Notebook").inner_text()


def test_a_kernel_past_the_accounts_limit_shows_the_researcher_why_and_what_to_do(world_tmp, make_system_user):
    """At ``kernels_per_account = 1`` with one kernel running, a new notebook's kernel is refused: Lab's dialog
    shows the launcher's reason and what to do, not "Unhandled error"."""
    site = make_site(world_tmp, {"onc": ["bc"]}, sandbox={"kernels_per_account": 1})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("ui")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        server.start_kernel()
        with new_notebook(server) as page:
            dialog = page.wait_for_selector(".jp-Dialog", timeout=60_000)
            text = dialog.inner_text()
            assert "already runs 1 kernel, the most one account may run at once" in text, text
            assert "Shut Down Kernel" in text and "Unhandled error" not in text, text


def test_closing_a_notebook_shuts_its_kernel_down(world_tmp, make_system_user):
    """The workspace's default: closing a notebook's tab ends its kernel (its memory, its budget reservation and
    its place among the account's kernels are free at once), as the server's kernels API then shows."""
    site = make_site(world_tmp, {"onc": ["bc"]})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("ui")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        with new_notebook(server) as page:
            wait_for_kernel(page)
            deadline = time.monotonic() + 60
            while not server.get("/api/kernels").json() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(server.get("/api/kernels").json()) == 1
            page.click(".lm-TabBar-tab.jp-mod-current .lm-TabBar-tabCloseIcon")
            # the new notebook was never saved: Lab asks first
            page.click(".jp-Dialog button:has([aria-label='Discard changes to file'])", timeout=30_000)
            deadline = time.monotonic() + 30
            while server.get("/api/kernels").json() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert server.get("/api/kernels").json() == [], page.content()[-2000:]


def test_the_gate_reads_a_streams_control_characters_as_jupyterlab_shows_them(world_tmp, make_system_user):
    """JupyterLab follows a stream's carriage returns and backspaces from one message to the next and drops
    escape sequences of a looser grammar than a terminal's; the row detection's view of the same text
    (``as_lab_shows``, which the server's :func:`paitient.rules.shown.follow_stream` feeds message by
    message) is what this Chromium shows, character for character."""
    from paitient.rules.edm.tokens import as_lab_shows

    texts = ["Z3.71", "\r1", "\n13.71x", "\b,20.83", "\nro", "w:7\n", "abcdef\rab\bX\n", "q\x1b[ 0m.5\n", "ab\b\b\bc\n"]
    texts += ["14\u00e9", "\b.26\n", "17\x1b[\b\b.99|\n"]  # a whole character; backspaces before escapes
    typed = repr([*texts, "END\n"])
    code = f"import sys, time; [(sys.stdout.write(t), sys.stdout.flush(), time.sleep(0.05)) for t in {typed}];"
    want = as_lab_shows("".join(texts).encode()).decode()
    assert want == "13.71\n13.71,20.83\nrow:7\naXef\nq.5\nc\n14.26\n17.99|\n"
    site = make_site(world_tmp, {"onc": ["bc"]})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("shown")
    with UserServer(site, user, ("onc",), world_tmp) as server, new_notebook(server) as page:
        wait_for_kernel(page)
        cell = run_cell(page, code, ".jp-OutputArea-output:has-text('END')")
        output = cell.locator(".jp-OutputArea-output").first
        assert output.inner_text() == want + "END\n", repr(output.inner_text())


def test_a_cell_running_across_a_reconnect_shows_the_line_the_gate_read(world_tmp, make_system_user):
    """JupyterLab's "Reconnect to Kernel" opens a new kernel websocket while a cell runs, and the cell goes on
    with the line it shows. The new connection did not follow that line, so its next message starts a line
    of its own: this Chromium shows the halves on two lines, as the gate read them (before, it showed
    ``row:7,1.5`` whole, which the gate never read)."""
    site = make_site(world_tmp, {"onc": ["bc"]})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("recon")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        sockets: list[str] = []
        with new_notebook(server, lambda page: page.on("websocket", lambda s: sockets.append(s.url))) as page:
            wait_for_kernel(page)
            code = "import time; print('ro', end='', flush=True); time.sleep(8); print('w:7,1.5'); print('END')"
            cell = run_cell(page, code, ".jp-OutputArea-output:has-text('ro')")
            page.locator(".lm-MenuBar-item", has_text="Kernel").click()
            page.locator(".lm-Menu-item", has_text="Reconnect to Kernel").click()
            cell.locator(".jp-OutputArea-output:has-text('END')").wait_for(timeout=60_000)
            assert cell.locator(".jp-OutputArea-output").first.inner_text() == "ro\nw:7,1.5\nEND\n"
        channels = [url for url in sockets if "/channels" in url]
        assert len(channels) == 2 and len(set(channels)) == 1, channels  # the same session's, again


def test_an_output_widget_printed_into_across_a_reconnect_shows_the_line_the_gate_read(world_tmp, make_system_user):
    """The same for an Output widget: after "Reconnect to Kernel", a later cell prints into a widget an
    earlier one made and left on ``ro``. JupyterLab keeps the widget's view and its line; the new connection
    did not follow it, so the print starts a line of its own there."""
    site = make_site(world_tmp, {"onc": ["bc"]})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("wrecon")
    with UserServer(site, user, ("onc",), world_tmp) as server, new_notebook(server) as page:
        wait_for_kernel(page)
        code = "import ipywidgets; w = ipywidgets.Output(); display(w)\nwith w: print('ro', end='', flush=True)"
        cell = run_cell(page, code, ".jp-OutputArea-output:has-text('ro')")
        page.locator(".lm-MenuBar-item", has_text="Kernel").click()
        page.locator(".lm-Menu-item", has_text="Reconnect to Kernel").click()
        page.wait_for_timeout(3_000)
        wait_for_kernel(page)
        run_cell(page, "with w: print('w:7,1.5', flush=True)\nprint('END')", ".jp-OutputArea-output:has-text('END')")
        cell.locator(".jp-OutputArea-output:has-text('w:7')").first.wait_for(timeout=30_000)
        assert cell.locator(".jp-OutputArea-output").first.inner_text() == "ro\nw:7,1.5\n"
