"""API tokens: researchers get none, and are told why; stewards and the operator keep theirs.

A token lets a script act as its owner from outside the browser, and every byte that reaches a researcher
is egress: with a token they could automate it. So nothing in the hub hands a researcher a token:

- their roles carry :data:`paitient.hub.signon.OWN_SCOPES` (JupyterHub's ``self`` less ``tokens``), and
  the default ``user`` role is given the same (:mod:`paitient.hub.hubconfig`), so JupyterHub's own scope
  checks refuse them on every token route;
- ``POST /hub/api/users/<name>/tokens`` for a researcher's account answers 403 with
  :data:`~paitient.hub.signon.NO_TOKENS_MESSAGE` whoever asks (a researcher who is also a steward, or an
  admin asking on their behalf, included), and the refusal goes to the audit trail as ``auth.token``;
- the ``/hub/token`` page refuses them with the same message, and the hub's menu (``templates/page.html``)
  shows its link only to users who may hold tokens.

The handlers come first in the hub's routing through the authenticator's ``get_handlers`` hook, ahead of
JupyterHub's handlers for the same routes; they subclass those and change nothing for anyone else. The
server's own token (``Spawner.server_token_scopes``) and the OAuth tokens of the user's server and of the
services are issued by the hub itself, not through these routes, and carry no token scopes.

A token issued before its owner became a researcher (a steward who joins a project, a hub that ran
without these rules) is revoked, not merely left without new siblings (:func:`revoke_held`): at the
hub's start for every researcher (:func:`sweep`), and whenever a sign-in or a refresh from the directory
finds that the account now holds the researcher role. A request made with such a token is refused as it
is revoked. Kept are the tokens the hub gave the researcher's own servers (their notes are the hub's, and
no token request may use them) and the OAuth tokens of their browser's sign-in to their server and the
services.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from jupyterhub import orm, roles
from jupyterhub.apihandlers.users import UserTokenListAPIHandler
from jupyterhub.handlers.pages import TokenPageHandler
from tornado import web

from paitient.hub.signon import NO_TOKENS_MESSAGE, shown

RESEARCHER_ROLE = "researcher"
TEMPLATES = Path(__file__).resolve().parent / "templates"
"""The hub's page templates that paitient overrides (searched before JupyterHub's own)."""


def refuses_tokens(user: Any) -> bool:
    """Whether ``user`` (JupyterHub's User or its database row) holds the researcher role, directly or
    through a group: such an account gets no API token."""
    orm_user = getattr(user, "orm_user", user)
    return any(role.name == RESEARCHER_ROLE for role in roles.get_roles_for(orm_user))


SERVER_TOKEN_NOTES = ("Server at ", "retrieved from spawner ")
"""How the hub begins the note of a token it gives a user's server (``User.spawn``, and a resumed server
whose token it did not know); a token request may not use them, so a sweep can tell the two apart."""
HUB_CLIENT = "jupyterhub"
"""The client id of tokens the hub issues itself (API and server tokens; OAuth tokens carry their client's)."""
RESERVED_NOTE_MESSAGE = (
    "A token note may not begin with 'Server at ' or 'retrieved from spawner ': the hub names its servers' "
    "own tokens so. Choose another note."
)


def _server_notes(orm_user: orm.User) -> set[str]:
    """The notes of the tokens the hub gave ``orm_user``'s servers that exist now."""
    notes = set()
    for name, spawner in orm_user.orm_spawners.items():
        if spawner.server is not None:
            notes.add(f"{SERVER_TOKEN_NOTES[0]}{spawner.server.base_url}")
            notes.add(f"{SERVER_TOKEN_NOTES[1]}{name}")
    return notes


def revoke_held(db: Any, orm_user: orm.User) -> list[orm.APIToken]:
    """Delete the API tokens ``orm_user`` holds other than their servers' own and their OAuth sign-ins;
    returns the deleted rows (committed). Call it only for accounts that :func:`refuses_tokens`."""
    keep = _server_notes(orm_user)
    gone = [t for t in orm_user.api_tokens if t.client_id == HUB_CLIENT and t.note not in keep]
    for token in gone:
        db.delete(token)
    if gone:
        db.commit()
    return gone


def sweep(db: Any) -> dict[str, list[str]]:
    """At the hub's start: :func:`revoke_held` for every researcher; user name -> prefixes of the tokens
    revoked (the first characters JupyterHub shows of a token, which identify it to its owner)."""
    revoked = {}
    for user in db.query(orm.User):
        if refuses_tokens(user):
            gone = revoke_held(db, user)
            if gone:
                revoked[user.name] = [t.prefix for t in gone]
    return revoked


def revoke_all(db: Any, orm_user: orm.User) -> list[orm.APIToken]:
    """Delete every token ``orm_user`` holds: API tokens, their servers' own and the OAuth sign-ins of their
    servers and the services (for an account whose access the directory withdrew); returns the deleted rows
    (committed)."""
    gone = list(orm_user.api_tokens)
    for token in gone:
        db.delete(token)
    if gone:
        db.commit()
    return gone


RESEARCHER_REASON = "researchers hold no API token"
OTHERS_REASON = "an API token is made by its own account only"
FOR_ANOTHER_MESSAGE = (
    "An API token is made by its own account only, not for another (not by an admin either): the other account "
    "signs in and makes its own."
)
WITHDRAWN_REASON = "access withdrawn in the directory"


def revoked_details(prefixes: list[str], reason: str = RESEARCHER_REASON) -> dict[str, Any]:
    """The details of the audit record ``auth.token`` of a revocation."""
    return {"reason": reason, "revoked": len(prefixes), "prefixes": prefixes}


def offers_tokens(user: Any) -> bool:
    """Template variable: show the Token page in the menu (the page itself also needs the ``tokens`` scope)."""
    return user is not None and not refuses_tokens(user)


class TokenRequestHandler(UserTokenListAPIHandler):
    """``/hub/api/users/<name>/tokens``: JupyterHub's handler, refusing any new token for a researcher."""

    async def post(self, user_name: str) -> None:
        owner = self.find_user(user_name)
        asking = self.current_user
        # who asks: the session's or token's user, else the credentials in the body (JupyterHub takes both)
        asking_user = (
            (asking.name if getattr(asking, "kind", "") == "user" else None)
            if asking is not None
            else await self._requester()
        )
        if owner is not None and asking_user is not None and asking_user != owner.name:
            # JupyterHub lets an admin make a token for anyone: for a steward, it reviews and approves as that
            # steward. Nobody here needs a token in another account's name.
            self.log.warning("API token for %s refused to %s: not their account", shown(owner.name), shown(asking_user))
            await self._audit(asking_user, owner.name, OTHERS_REASON)
            raise web.HTTPError(403, FOR_ANOTHER_MESSAGE)
        if owner is None or not refuses_tokens(owner):
            body = self.get_json_body() or {}
            note = body.get("note") if isinstance(body, dict) else None
            if isinstance(note, str) and note.startswith(SERVER_TOKEN_NOTES):
                raise web.HTTPError(400, RESERVED_NOTE_MESSAGE)
            return await super().post(user_name)
        requester = await self._requester()
        if requester is None:
            # who asks is not known: the answer JupyterHub gives them, saying nothing about the account
            raise web.HTTPError(403)
        self.log.warning("API token for %s refused to %s: researchers get none", shown(owner.name), shown(requester))
        await self._audit(requester, owner.name)
        raise web.HTTPError(403, NO_TOKENS_MESSAGE)

    async def _requester(self) -> str | None:
        """The name of who asks: the session or token of the request, else the credentials in its body
        (as JupyterHub's handler accepts them), else None. Credentials are checked once per request."""
        if self.current_user is not None:
            return self.current_user.name
        if not hasattr(self, "_body_requester"):
            self._body_requester = await self._body_credentials()
        return self._body_requester

    async def _body_credentials(self) -> str | None:
        body = self.get_json_body() or {}
        if not isinstance(body, dict) or not body.get("auth"):
            return None
        try:
            authenticated = await self.authenticate(body["auth"])
        except Exception as e:  # a refusal, or data the authenticator cannot read: not identified
            self.log.info("token request with credentials in the body not identified: %s", type(e).__name__)
            return None
        if isinstance(authenticated, dict):
            return authenticated.get("name")
        return authenticated or None

    async def _audit(
        self, requester: str, owner: str, reason: str = "the workspace issues no API tokens to researchers"
    ) -> None:
        site = getattr(self.authenticator, "site", None)
        if site is None:
            return
        from paitient.hub import records

        details = {"reason": reason}
        if requester != owner:
            details["user"] = owner
        # nothing was issued: the record needs not come first, and one the trail cannot take waits for it
        await asyncio.to_thread(
            records.record, site, actor=requester, action="auth.token", object=owner, outcome="denied", details=details
        )


class TokenPage(TokenPageHandler):
    """``/hub/token``: JupyterHub's page, refused to researchers with the reason."""

    @web.authenticated
    async def get(self) -> None:
        if refuses_tokens(self.current_user):
            raise web.HTTPError(403, NO_TOKENS_MESSAGE)
        return await super().get()


def handlers() -> list[tuple[str, type[web.RequestHandler]]]:
    """Routes (relative to the hub's prefix) that take precedence over JupyterHub's own."""
    return [(r"/api/users/([^/]+)/tokens", TokenRequestHandler), (r"/token", TokenPage)]
