"""A service run on its own in another pod than the hub (Kubernetes' services' pod): its pages bind the address
``--listen`` names, not loopback, and it asks the hub's API where ``--hub-api-url`` says. A real ledger service
as root; the hub's API is a loopback listener that records who calls it and answers 403."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from paitient.config.reference import effective_toml
from tests.relay.conftest import free_port
from tests.server.harness import make_site, service_process

SERVICE_TOKEN = "ledger-service-token-3f9c"  # noqa: S105 (a test's)


class HubAPI(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        HubAPI.seen.append((self.path, self.headers.get("Authorization", "")))
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": 403, "message": "not a token of this hub"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub_api() -> Iterator[int]:
    HubAPI.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_a_separate_service_binds_where_told_and_asks_the_hub_api_it_is_given(world_tmp, hub_api):
    site = make_site(world_tmp, {"onc": ["bc"]})
    site_file = site.state_dir / "ledger-site.toml"
    site_file.write_text(effective_toml(site))
    token = world_tmp / "ledger-token"
    token.write_text(SERVICE_TOKEN)
    token.chmod(0o600)
    port = free_port()
    args = (
        f"--site={site_file}",
        "--separate",
        f"--port={port}",
        f"--token-file={token}",
        f"--hub-api-url=http://127.0.0.1:{hub_api}/hub/api",
        "--listen=127.0.0.2",  # an address of this machine that is not the pages' URL's
    )
    with service_process("ledger", site.run_dir / "ledger.sock", *args, log_path=world_tmp / "ledger.log"):
        deadline = time.monotonic() + 30
        while not answers("127.0.0.2", port):
            assert time.monotonic() < deadline, (world_tmp / "ledger.log").read_text()
            time.sleep(0.1)
        assert not answers("127.0.0.1", port)  # not loopback's usual address: only where --listen said
        conn = http.client.HTTPConnection("127.0.0.2", port, timeout=30)
        conn.request("GET", "/services/ledger/", headers={"Authorization": "token someones-token"})
        refused = conn.getresponse()
        # the hub did not know the token: the page sends the browser to sign in
        assert refused.status == 302, refused.read()
        assert "/hub/api/oauth2/authorize" in refused.getheader("Location", ""), refused.getheaders()
        conn.close()
    # before that, the service asked the hub's API it was given about the caller's token
    assert [(path, auth) for path, auth in HubAPI.seen if path.startswith("/hub/api/user")], HubAPI.seen
    assert any("someones-token" in auth for _, auth in HubAPI.seen), HubAPI.seen


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--listen=0.0.0.0",), "are for a service run with --separate"),
        (("--separate", "--port=1", "--token-file=/nonexistent"), "needs --port, --token-file and --hub-port"),
        (("--separate", "--port=1", "--token-file=/x", "--hub-api-url=hub:8081"), "--hub-api-url must be"),
    ],
)
def test_wrong_separate_options_are_refused_with_what_to_give(world_tmp, args, says):
    import subprocess
    import sys

    site = make_site(world_tmp, {"onc": ["bc"]})
    site_file = site.state_dir / "ledger-site.toml"
    site_file.write_text(effective_toml(site))
    r = subprocess.run(
        [sys.executable, "-m", "paitient.cli", "service", "ledger", f"--site={site_file}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and says in r.stderr, r.stderr
