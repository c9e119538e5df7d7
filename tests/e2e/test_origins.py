"""One origin or many: what a page on a researcher's server can do to the steward viewing it.

With ``[workspace] subdomain_host`` every server and service has an origin of its own (security model, 17b).
A page served from alice's origin then cannot read or drive the airlock's pages in the steward's browser:
the same-origin policy stands between them. Without it (the one-origin workspace of the other e2e tests)
the same page reads the steward's signed-in review page, and could as well fill in and submit its forms in
his name: the test sees the difference, so it cannot pass by not trying.

The hostile page stands in for a server alice controlled (the case 17b leaves): a loopback HTTP server,
routed by the workspace's real proxy under alice's server's path and origin. Everything else is real: the
hub, the proxy routing by host, the services' sign-in through the hub's OAuth, the system Chromium.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from paitient.hub.paths import HubPaths
from paitient.ops.up import Running
from tests.e2e.workspace import Workspace, own_workspace
from tests.labpage import run_cell, wait_for_kernel

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

ATTACK = """<!doctype html>
<title>alice's page</title>
<button id="go">open</button>
<button id="hub">hub</button>
<pre id="out"></pre>
<script>
const AIRLOCK = %(airlock)s;
const STEWARD = "sam";
document.getElementById("go").onclick = async () => {
  const out = {};
  const w = window.open(AIRLOCK);
  for (let i = 0; i < 100; i++) {
    await new Promise((r) => setTimeout(r, 100));
    try { if (w.document.readyState === "complete" && w.document.title) break; } catch (e) { break; }
  }
  await new Promise((r) => setTimeout(r, 1000));
  try {
    out.window = "read: " + w.document.title + " | " + (w.document.body.innerText.includes("signed in as")
      ? "signed in" : "not signed in");
  } catch (e) { out.window = "refused: " + e.name; }
  document.getElementById("out").textContent = JSON.stringify(out);
};
document.getElementById("hub").onclick = async () => {
  const out = {};
  try {
    const r = await fetch("/hub/home", {credentials: "include"});
    const text = await r.text();
    const xsrf = /xsrf_token: "([^"]+)"/.exec(text);
    out.home = "read: " + r.status + (xsrf ? " with the xsrf token" : " without one");
    const t = await fetch("/hub/api/users/" + STEWARD + "/tokens", {
      method: "POST", credentials: "include",
      headers: {"Content-Type": "application/json", "X-XSRFToken": xsrf ? xsrf[1] : ""},
      body: JSON.stringify({note: "from alice's page"}),
    });
    out.token = "answered: " + t.status;
  } catch (e) { out.home = out.home || "refused: " + e.name; }
  document.getElementById("out").textContent = JSON.stringify(out);
};
</script>
"""


@contextmanager
def hostile_page(ws: Workspace, host: str, path: str, airlock: str) -> Iterator[str]:
    """Serve :data:`ATTACK` on loopback and route ``host`` + ``path`` to it through the workspace's proxy (its
    REST API, with the proxy's token); the route and the server are gone afterwards. Yields the page's URL
    path on that host."""
    body = (ATTACK % {"airlock": json.dumps(airlock)}).encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    paths = HubPaths(ws.state_dir)
    running = Running.read(paths.up_file)
    route = f"http://127.0.0.1:{running.proxy_api_port}/api/routes/{(host + path).lstrip('/')}"
    headers = {"Authorization": f"token {paths.secret('proxy_token')}"}

    def call(method: str, data: bytes | None = None) -> int:
        req = urllib.request.Request(route, data=data, method=method, headers=headers)  # noqa: S310 - loopback
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return r.status

    target = json.dumps({"target": f"http://127.0.0.1:{server.server_address[1]}"}).encode()
    assert call("POST", target) == 201
    try:
        yield path
    finally:
        call("DELETE")
        server.shutdown()
        server.server_close()
        thread.join(10)


def sign_in(page, url: str, user: str, password: str) -> None:
    page.goto(url, timeout=60_000)
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("[type=submit]")
    page.wait_for_load_state("networkidle", timeout=60_000)


def attack_as_viewed_by_the_steward(
    ws: Workspace, browser, page_url: str, button: str = "go", sign_in_at: str = ""
) -> dict[str, str]:
    """Sign the steward in (he lands on the airlock's review page; ``sign_in_at``: from that address instead
    of the workspace's), then have him open ``page_url`` and press its ``button``; the page's findings."""
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in(page, sign_in_at or ws.browser_url, "sam", ws.password("sam"))
        assert "/services/airlock/" in page.url, page.url
        assert "signed in as" in page.inner_text("header")
        page.goto(page_url, timeout=60_000)
        page.click(f"#{button}")
        page.wait_for_function("document.getElementById('out').textContent !== ''", timeout=60_000)
        return json.loads(page.inner_text("#out"))
    finally:
        context.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def origins():
    with own_workspace("paitient-e2e-origins-", "pto", subdomains=True) as ws:
        yield ws


def test_one_origin_lets_a_servers_page_read_the_stewards_review_page(workspace, browser):
    """The one-origin workspace, as 17b describes it: the page on alice's path reads what the steward sees."""
    airlock = workspace.browser_url + "services/airlock/"
    with hostile_page(workspace, "", "/user/alice/stand-in/", airlock) as path:
        found = attack_as_viewed_by_the_steward(workspace, browser, workspace.browser_url.rstrip("/") + path)
    assert found["window"].startswith("read: Requests"), found
    assert found["window"].endswith("| signed in"), found


def test_with_subdomains_a_servers_page_cannot_read_or_drive_the_stewards_pages(origins, browser):
    port = origins.port
    airlock = f"http://airlock--service.localhost:{port}/services/airlock/"
    with hostile_page(origins, "alice.localhost", "/user/alice/stand-in/", airlock) as path:
        found = attack_as_viewed_by_the_steward(origins, browser, f"http://alice.localhost:{port}{path}")
    # the window opened, on the airlock's origin, and its document is out of the page's reach
    assert found["window"] == "refused: SecurityError", found


def test_with_subdomains_each_part_answers_on_its_own_origin_and_the_links_between_them_work(origins, browser):
    """The steward lands on the airlock's origin and follows the header to every service and the hub, signed
    in on each through the hub; the researcher lands in JupyterLab on her own origin and runs a cell."""
    port = origins.port
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in(page, origins.browser_url, "sam", origins.password("sam"))
        assert page.url == f"http://airlock--service.localhost:{port}/services/airlock/", page.url
        links = page.eval_on_selector_all("header nav a", "els => els.map(e => e.href)")
        assert links == [
            f"http://{name}--service.localhost:{port}/services/{name}/"
            for name in ("airlock", "ledger", "audit", "egress")
        ] + [f"http://localhost:{port}/hub/home"], links
        for link in links[1:]:
            page.goto(link, timeout=60_000)
            page.wait_for_load_state("networkidle", timeout=60_000)
            assert page.url == link, (link, page.url)
            if "--service." in link:
                assert "signed in as sam" in page.inner_text("header"), link
    finally:
        context.close()

    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in(page, origins.browser_url, "alice", origins.password("alice"))
        page.wait_for_url(re.compile(rf"http://alice\.localhost:{port}/user/alice/lab.*"), timeout=120_000)
        page.click(".jp-LauncherCard[title*='Python 3 (sandbox)']", timeout=60_000)
        wait_for_kernel(page)
        cell = run_cell(page, "6 * 7", ".jp-OutputArea-output:has-text('42')")
        assert "42" in cell.locator(".jp-OutputArea").inner_text()
        # while the server refused JupyterLab's event stream, Lab subscribed again within seconds, and each
        # refused upgrade made the proxy log an uncaught "write EPIPE"
        page.wait_for_timeout(8_000)
        assert "EPIPE" not in (origins.state_dir / "logs" / "proxy.log").read_text(errors="replace")
    finally:
        context.close()


def test_with_subdomains_the_hub_answers_on_its_own_host_only(origins):
    """The proxy sends every host without a route of its own to the hub, which answered on any host: its
    sign-in form on alice's origin left the steward's hub cookies there. Now a host below the hub's domain
    gets only JupyterHub's answer for a server that is not running; every other page is on the hub's host."""
    port = origins.port
    hub = f"http://localhost:{port}"

    def ask(method: str, host: str, path: str) -> requests.Response:
        return requests.request(
            method,
            f"http://127.0.0.1:{port}{path}",
            headers={"Host": f"{host}:{port}"},
            allow_redirects=False,
            timeout=10,
        )

    for host in ("alice.localhost", "airlock--service.localhost", "nobody.localhost"):
        for path in ("/hub/login?next=%2Fhub%2Fhome", "/hub/home", "/hub/token", "/"):
            r = ask("GET", host, path)
            assert (r.status_code, r.headers.get("Location")) == (302, hub + path), (host, path)
        r = ask("POST", host, "/hub/api/users/sam/tokens")
        assert r.status_code == 404 and f"the hub answers at {hub}/ only" in r.text
    assert ask("GET", "localhost", "/hub/login").status_code == 200  # the hub's own host
    # a server that is not running: JupyterHub's own answer, on to the hub's host to start it
    r = ask("GET", "carol.localhost", "/user/carol/lab")
    assert r.status_code == 302 and r.headers["Location"].startswith(f"{hub}/hub/user/carol/"), r.headers


def test_with_subdomains_a_servers_page_cannot_mint_the_stewards_token(origins, browser):
    """The attack the one-host rule stops: the steward's sign-in starts on alice's host (a link she sent),
    then her page asks the hub on its own origin for his token. He signs in on the hub's host instead, and
    her page reaches no page of the hub's."""
    port = origins.port
    airlock = f"http://airlock--service.localhost:{port}/services/airlock/"
    with hostile_page(origins, "alice.localhost", "/user/alice/stand-in/", airlock) as path:
        found = attack_as_viewed_by_the_steward(
            origins,
            browser,
            f"http://alice.localhost:{port}{path}",
            button="hub",
            sign_in_at=f"http://alice.localhost:{port}/hub/login",
        )
    # /hub/home on alice's host sends the page to the hub's host, another origin, which it may not read
    assert found == {"home": "refused: TypeError"}, found
