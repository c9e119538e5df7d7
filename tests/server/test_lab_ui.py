"""A researcher's first minutes in the locked-down JupyterLab, in the system Chromium."""

import pytest

from tests.server.harness import UserServer, make_site, publish

pytestmark = pytest.mark.browser


def test_new_notebook_reads_a_dataset_and_no_plugin_fails(world_tmp, make_system_user):
    from playwright.sync_api import sync_playwright

    site = make_site(world_tmp, {"onc": ["bc"]})
    publish(site, "onc", "bc", "tumour,size\nA,2.5\n")
    user = make_system_user("ui")
    with UserServer(site, user, ("onc",), world_tmp) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            failures: list[str] = []
            page.on("console", lambda m: failures.append(m.text) if "activat" in m.text else None)
            page.goto(f"{server.url}/lab?token={server.token}", timeout=60_000)
            page.click(".jp-LauncherCard[title*='Python 3 (sandbox)']", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=30_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000)
            editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
            editor.click()
            page.keyboard.type("import pandas as pd; pd.read_csv('/data/onc/bc/data.csv')")
            assert "read_csv" in editor.inner_text()
            # Now and then the first Shift+Enter sends nothing (seen twice in full runs: the server never
            # received an execute request, the kernel was idle). Press again, as a researcher would; the
            # cell is idempotent, and a run that never shows the table still fails.
            table = None
            for _ in range(3):
                editor.click()
                page.keyboard.press("Shift+Enter")
                try:
                    table = page.wait_for_selector(".jp-OutputArea-output table", timeout=40_000)
                    break
                except Exception:  # noqa: BLE001, S112 - retried, and reported below when it never came
                    continue
            if table is None:
                raise AssertionError(
                    "no table; output: "
                    + page.locator(".jp-OutputArea").first.inner_text()
                    + "\n"
                    + server.logs()[-2000:]
                )
            assert "tumour" in table.inner_text() and "2.5" in table.inner_text()
            assert failures == []
        finally:
            browser.close()
