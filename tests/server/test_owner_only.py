"""Only the server's owner signs in to it (``paitient.server.app.owner_only``), whatever scopes the hub gave
another account. The whole path, an admin's browser turned away from a researcher's server through the hub's
sign-in, is in tests/e2e/test_workspace.py
(``test_an_admin_makes_no_token_for_another_account_and_no_researcher_is_an_admin``)."""

from __future__ import annotations

import asyncio

import pytest
from tornado.web import HTTPError

from paitient.server.app import identity_problem, owner_only


class HubUser:
    def __init__(self, name: str, kind: str = "user"):
        self.username = name
        self.hub_user = {"name": name, "kind": kind, "scopes": ["access:servers!server=alice/"]}


class Provider:
    """What JupyterHub's identity provider answers: whoever the hub signed in with the server's scope."""

    hub_auth = object()

    def __init__(self, user):
        self.user = user

    async def get_user(self, handler):
        return self.user


class Handler:
    def redirect(self, *args, **kwargs):
        return "to the hub's sign-in"


def signed_in(provider, handler=None):
    return asyncio.run(provider.get_user(handler or Handler()))


def test_the_owner_signs_in_and_an_admin_or_a_service_with_the_scope_is_refused_403():
    alice = HubUser("alice")
    provider = Provider(alice)
    owner_only(provider, "alice")
    assert signed_in(provider) is alice
    for other in (HubUser("dave"), HubUser("alice", kind="service")):
        provider.user, handler = other, Handler()
        assert signed_in(provider, handler) is None
        with pytest.raises(HTTPError) as e:
            handler.redirect("/hub/login")  # tornado's @authenticated sends the refused there: a 403 instead
        assert e.value.status_code == 403 and "only its owner signs in here" in e.value.log_message
    provider.user = None
    assert signed_in(provider) is None  # nobody signed in: the hub's sign-in, as before


def test_a_server_naming_no_owner_lets_nobody_in_and_one_without_the_check_is_not_locked_down():
    provider = Provider(HubUser("alice"))
    owner_only(provider, "")
    assert signed_in(provider) is None
    assert identity_problem(provider) == ""
    unchecked = Provider(HubUser("alice"))
    assert identity_problem(unchecked) == "the hub's identity provider lets in others than the server's owner"

    class BareProvider:  # a server the hub did not start (a token in the URL): no hub user to check
        pass

    assert identity_problem(BareProvider()) == ""
