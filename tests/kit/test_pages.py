"""The service kit's pages: one base template (escaped, headers, navigation), hub sign-in with a required scope,
JSON errors under the API and escaped HTML errors elsewhere, never a traceback."""

from __future__ import annotations

import json

import pytest
from jupyterhub.services.auth import HubOAuth
from tornado import web

from paitient.services.kit import pages, render
from tests.scrape import Served, header_auth

PREFIX = "/services/ledger/"
SERVICE = "ledger"
SCOPE = "custom:ledger:read"
HOSTILE = "<script>alert('x')</script>\"&"


class Greeting(pages.ScopedPage):
    required_scope = SCOPE
    needed_for = "the test page"

    def get(self) -> None:
        self.render_page("greeting.html", said=self.get_argument("say", ""))


class Echo(pages.ScopedPage):
    required_scope = SCOPE

    def get(self) -> None:
        self.write_json({"user": self.username, "said": self.get_argument("say", "")})


class Refusing(pages.ScopedPage):
    required_scope = SCOPE

    def get(self) -> None:
        raise web.HTTPError(409, "request %s is already <b>decided</b>", self.get_argument("id", ""))


class Crashing(pages.ScopedPage):
    required_scope = SCOPE

    def get(self) -> None:
        raise RuntimeError("Traceback-worthy secret: /var/lib/paitient/ledger.db")


class NoScope(pages.ScopedPage):
    def get(self) -> None:
        self.write("anyone?")


@pytest.fixture
def templates(tmp_path):
    (tmp_path / "greeting.html").write_text(
        '{% extends "kit/base.html" %}{% block main %}<p id="said">{{ said }}</p>'
        '<a id="link" href="{{ prefix }}?q={{ said }}">again</a>{% endblock %}'
    )
    return tmp_path


@pytest.fixture
async def fetch(templates):
    auth = header_auth(PREFIX, "ledger")
    routes = [
        ("", Greeting),
        ("api/echo", Echo),
        ("refuse", Refusing),
        ("api/refuse", Refusing),
        ("crash", Crashing),
        ("api/crash", Crashing),
    ]
    app = pages.make_app(routes, service="ledger", prefix=PREFIX, template_dir=templates, hub_auth=auth)
    served = Served(app, PREFIX)
    yield served.as_user("sam", SCOPE)
    served.close()


async def test_base_template_escapes_and_carries_the_security_headers(fetch):
    r = await fetch("?say=" + "%3Cscript%3Ealert('x')%3C%2Fscript%3E%22%26", user="<b>sam</b>")
    body = r.body.decode()
    assert r.code == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<p id="said">&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;&amp;</p>' in body
    assert 'href="/services/ledger/?q=&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;&amp;"' in body
    assert "signed in as <strong>&lt;b&gt;sam&lt;/b&gt;</strong>" in body
    assert "<script" not in body and "style=" not in body and "<style" not in body
    assert r.headers["Content-Security-Policy"] == pages.CSP and "script-src" not in pages.CSP
    assert "default-src 'none'" in pages.CSP and "frame-ancestors 'none'" in pages.CSP
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Referrer-Policy"] == "no-referrer" and r.headers["Cache-Control"] == "no-store"


async def test_base_template_links_the_services_and_one_stylesheet(fetch):
    body = (await fetch("")).body.decode()
    assert '<a href="/services/airlock/">Airlock</a>' in body
    assert '<a href="/services/ledger/" aria-current="page">Privacy ledger</a>' in body
    assert '<a href="/services/audit/">Audit trail</a>' in body and '<a href="/hub/home">Hub</a>' in body
    assert '<link rel="stylesheet" href="/services/ledger/static/paitient.css?v=' in body
    css = await fetch("static/paitient.css", user=None)
    assert css.code == 200 and b"header nav" in css.body


async def test_the_scope_is_required(fetch):
    page = await fetch("", scopes="access:services!service=ledger")
    assert page.code == 403 and "user sam is not allowed" in page.body.decode()
    assert 'id="error-message"' in page.body.decode() and "said" not in page.body.decode()
    api = await fetch("api/echo", scopes="custom:audit:read")
    assert api.code == 403 and api.headers["Content-Type"] == "application/json"
    assert json.loads(api.body) == {
        "error": "this page needs signing in through the hub with the custom:ledger:read scope",
        "status": 403,
    }
    ok = await fetch("api/echo?say=hi")
    assert json.loads(ok.body) == {"user": "sam", "said": "hi"}


async def test_anonymous_pages_go_to_the_hub_and_the_api_refuses(fetch):
    page = await fetch("", user=None)
    assert page.code == 302 and page.headers["Location"].startswith("/hub/api/oauth2/authorize?")
    api = await fetch("api/echo", user=None)
    assert api.code == 403 and json.loads(api.body)["status"] == 403 and "Location" not in api.headers


async def test_errors_are_escaped_html_or_json_and_never_a_traceback(fetch):
    refused = await fetch("refuse?id=<i>1</i>")
    assert refused.code == 409
    assert "request &lt;i&gt;1&lt;/i&gt; is already &lt;b&gt;decided&lt;/b&gt;" in refused.body.decode()
    api = await fetch("api/refuse?id=7")
    assert json.loads(api.body) == {"error": "request 7 is already <b>decided</b>", "status": 409}
    for path in ("crash", "api/crash"):
        r = await fetch(path)
        assert r.code == 500 and b"Traceback" not in r.body and b"secret" not in r.body, r.body
    assert b"the service could not answer; its log has the details" in r.body
    assert r.headers["Content-Security-Policy"] == pages.CSP  # error answers keep the headers


async def test_unknown_paths_get_the_same_404(fetch):
    r = await fetch("nowhere/<b>", user=None)
    assert r.code == 404 and b"there is no such page here" in r.body and b"<b>" not in r.body
    assert r.headers["Content-Security-Policy"] == pages.CSP
    api = await fetch("api/nowhere")
    assert json.loads(api.body) == {"error": "there is no such page here", "status": 404}


def test_every_page_must_name_its_scope(templates):
    with pytest.raises(ValueError, match="NoScope names no required_scope"):
        pages.make_app([("", NoScope)], service="ledger", prefix=PREFIX, hub_auth=HubOAuth(api_token="x"))


def test_standalone_rendering_escapes_too(templates):
    namespace = render.base_namespace(service="audit", prefix="/services/audit/", user={"name": "x"})
    html = render.render(render.environment(templates), "greeting.html", namespace, said=HOSTILE)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;&amp;" in html and "<script" not in html
    with pytest.raises(RuntimeError, match="a form needs a request's XSRF token"):
        namespace["xsrf_form_html"]()


class Poster(pages.ScopedPage):
    required_scope = SCOPE

    def post(self) -> None:
        self.write("done")

    def get(self) -> None:
        self.write(f"hello {self.username}")


def test_a_post_whose_xsrf_cookie_names_another_sign_in_is_refused_and_the_service_answers_on(templates):
    """Attack (availability): a POST with the steward's own sign-in cookie and an XSRF cookie signed for
    another sign-in (a second session's, or one a page of a sibling origin set for the parent domain). The
    hub's client, asked who signed in, made a new XSRF cookie and asked again from inside, on the one thread
    its first look held: the service hung for everyone until it was killed. Now the POST is refused at
    once, and the service goes on answering. The hub's own client runs here, with its two HTTP calls
    answered locally (tests/airlock/helpers.py)."""
    import base64

    import requests
    from tornado.web import create_signed_value

    from paitient.services.kit.process import free_port
    from tests.airlock.helpers import HubApiDouble

    access = f"access:services!service={SERVICE}"
    auth = HubApiDouble(
        codes={"c1": {"name": "sam", "scopes": [SCOPE, access]}},
        api_token="not-used",
        api_url="http://127.0.0.1:9/hub/api",
        hub_prefix="/hub/",
        base_url=PREFIX,
        oauth_client_id=f"service-{SERVICE}",
        access_scopes={access},
        oauth_redirect_uri=f"http://127.0.0.1:8000{PREFIX}oauth_callback",
    )
    secret = b"s" * 32
    app = pages.make_app(
        [("", Poster)], service=SERVICE, prefix=PREFIX, template_dir=templates, hub_auth=auth, cookie_secret=secret
    )
    port = free_port()
    web_thread = pages.WebThread(app, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}{PREFIX}"
        signed_in = {auth.cookie_name: create_signed_value(secret, auth.cookie_name, "token-x-c1").decode()}
        assert requests.get(url, cookies=signed_in, timeout=10).text == "hello sam"  # the sign-in works
        other = base64.urlsafe_b64encode(create_signed_value(secret, "_xsrf", "another-session:id")).rstrip(b"=")
        posted = requests.post(
            url, cookies={**signed_in, "_xsrf": other.decode()}, data={"_xsrf": other.decode()}, timeout=10
        )
        assert posted.status_code == 403, posted.text
        assert "XSRF cookie does not match" in posted.text
        assert requests.get(url, cookies=signed_in, timeout=10).text == "hello sam"  # still answering
    finally:
        web_thread.stop()
