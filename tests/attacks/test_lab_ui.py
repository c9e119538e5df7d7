"""JupyterLab in the system Chromium: the download and export commands are gone from the menus."""

import pytest

pytestmark = pytest.mark.browser


def _menu_items(page, menu: str) -> list[str]:
    page.click(f"li.lm-MenuBar-item:has-text('{menu}')")
    page.wait_for_selector(".lm-Menu-content", timeout=10_000)
    items = page.locator(".lm-Menu-content .lm-Menu-itemLabel").all_inner_texts()
    page.keyboard.press("Escape")
    return [i.strip() for i in items if i.strip()]


def test_file_menu_has_no_download_or_export(world):
    from playwright.sync_api import sync_playwright

    server = world.server_a
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/lab?token={server.token}", timeout=60_000)
            page.wait_for_selector("li.lm-MenuBar-item:has-text('File')", timeout=60_000)
            items = _menu_items(page, "File")
            assert "Save All" in items or "Save" in " ".join(items), items  # the menu did render
            assert not any("Download" in i for i in items), items
            assert not any("Export" in i for i in items), items
            page.click(".jp-DirListing-item:has-text('notes.txt')", button="right", timeout=20_000)
            page.wait_for_selector(".lm-Menu-content", timeout=10_000)
            context = page.locator(".lm-Menu-content .lm-Menu-itemLabel").all_inner_texts()
            assert any("Rename" in i for i in context), context
            assert not any("Download" in i or "Copy Download Link" in i or "New Browser Tab" in i for i in context), (
                context
            )
        finally:
            browser.close()
