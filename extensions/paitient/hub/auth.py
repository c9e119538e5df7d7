"""Hospital sign-on: LDAPAuthenticator with projects from directory groups, roles, and clear refusals.

``PaitientLDAPAuthenticator`` (entry point ``paitient-ldap``) binds as the user (bind-DN template, or
search-then-bind with a service account for Active Directory), reads the groups whose ``member`` holds
the user's DN, and returns the projects as JupyterHub groups and the steward/researcher roles as
JupyterHub roles (``manage_groups`` and ``manage_roles`` are on). Refusals:

- a name carrying anything outside ``[a-z0-9._-]`` is refused before any directory call;
- a wrong or empty password and an unknown user get the generic "Invalid username or password";
- a user in no project (and neither steward nor admin) is told so on the login page;
- an unreachable directory gives a message on the login page, not a 500; the next attempt tries again.

With a service account, ``refresh_user`` re-reads memberships every ``auth_refresh_age`` seconds and signs
out a user who lost every project. Every attempt is recorded in the audit trail as ``auth.login`` with
outcome ``ok``, ``denied`` or ``error``. Blocking directory calls run in a thread, with timeouts.

The authenticator also registers the hub's token routes that refuse researchers
(:mod:`paitient.hub.tokens`), so any hub that signs people in through it applies that rule.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import (
    LDAPBindError,
    LDAPCertificateError,
    LDAPCommunicationError,
    LDAPException,
    LDAPResponseTimeoutError,
    LDAPStartTLSError,
)
from ldap3.core.tls import Tls
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from ldapauthenticator import LDAPAuthenticator
from ldapauthenticator.ldapauthenticator import TlsStrategy
from tornado import web
from traitlets import Bool, Dict, Float, Instance, Integer, List, Unicode, default

from paitient.config import ConfigError, SiteConfig, check_owner
from paitient.hub import records, signon
from paitient.hub.signon import Membership

UNAVAILABLE = (LDAPCommunicationError, LDAPStartTLSError, LDAPCertificateError, ssl.SSLError)
"""Network, TLS and certificate failures: to the user, the directory cannot be reached."""


class DirectoryUnavailable(Exception):
    """The directory could not be reached or refused to talk (network, timeout, TLS)."""


class ServiceAccountRefused(Exception):
    """The service account used for search-then-bind could not bind."""


class AccountRefused(Exception):
    """The password bound, but the account may not sign in (the reason is for the audit trail, not the user)."""


@dataclass(frozen=True)
class Signed:
    dn: str
    membership: Membership


class PaitientLDAPAuthenticator(LDAPAuthenticator):
    """LDAP / Active Directory sign-on mapping directory groups to paitient projects and roles."""

    manage_groups = Bool(True, config=True, help="Projects become JupyterHub groups, kept in step with the directory.")
    manage_roles = Bool(
        True, config=True, help="researcher / steward / admin roles come from the directory at each sign-in."
    )

    project_groups = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="Project name -> directory group (full DN, or a cn looked up under group_base).",
    )
    steward_group = Unicode("", config=True, help="Members get the steward role (DN or cn).")
    admin_group = Unicode("", config=True, help="Members become JupyterHub admins (DN or cn).")
    group_base = Unicode(
        "", config=True, help="Subtree holding the groups; empty: each configured group DN is read directly."
    )
    timeout = Float(5.0, config=True, help="Seconds to wait for the directory to connect and to answer.")
    failed_signins = Integer(5, config=True, help="Failed sign-ins a name may have within failed_signin_pause.")
    failed_signin_pause = Float(300.0, config=True, help="Seconds a name's failed sign-ins count against it.")
    refusals_recorded = Integer(
        60, config=True, help="Refused sign-ins recorded one by one in a minute; the rest as one count."
    )
    active_filter = Unicode(
        "",
        config=True,
        help="An LDAP filter a user's entry must match to sign in and to stay signed in (a disabled account does "
        "not); empty: every entry that binds.",
    )
    service_password_file = Unicode("", config=True, help="Root-only file holding the lookup_dn_search_user password.")
    site = Instance(SiteConfig, allow_none=True, config=True, help="The site configuration (audit trail location).")

    steward_scopes = List(
        Unicode(),
        config=True,
        help="Scopes of the steward role (the audit view's scopes are added by default).",
    )

    researcher_scopes = List(
        Unicode(),
        list(signon.BASE_RESEARCHER_SCOPES),
        config=True,
        help="Scopes of the researcher role (project members); the hub adds the services' request scopes.",
    )

    @default("steward_scopes")
    def _steward_scopes_default(self) -> list[str]:
        from paitient.services.audit.service import role_scopes

        return [*signon.BASE_STEWARD_SCOPES, *role_scopes()]

    @default("lookup_dn_search_password")
    def _service_password_default(self) -> str | None:
        if not self.service_password_file:
            return None
        path = Path(self.service_password_file)
        check_owner(path, secret=True)
        return path.read_text().rstrip("\n")

    # ------------------------------------------------------------------ validation
    def validate_username(self, username: str) -> bool:
        if signon.username_problem(username, allow_at=self._allow_at):
            return False
        return super().validate_username(username)

    @property
    def _allow_at(self) -> bool:
        return self.user_attribute == "userPrincipalName"

    # ------------------------------------------------------------------ directory access
    def get_connection(self, userdn: str, password: str) -> ldap3.Connection | None:
        """Bound connection, or None when the directory refused the credentials.

        Raises :class:`DirectoryUnavailable` for network, timeout and TLS failures.
        """
        if self.tls_strategy == TlsStrategy.on_connect:
            use_ssl, auto_bind = True, ldap3.AUTO_BIND_NO_TLS
        elif self.tls_strategy == TlsStrategy.before_bind:
            use_ssl, auto_bind = False, ldap3.AUTO_BIND_TLS_BEFORE_BIND
        else:
            use_ssl, auto_bind = False, ldap3.AUTO_BIND_NO_TLS
        server = ldap3.Server(
            self.server_address,
            port=self.server_port,
            use_ssl=use_ssl,
            tls=Tls(**self.tls_kwargs),
            get_info=ldap3.NONE,
            connect_timeout=self.timeout,
        )
        try:
            return ldap3.Connection(
                server,
                user=userdn,
                password=password,
                auto_bind=auto_bind,
                receive_timeout=max(1, math.ceil(self.timeout)),  # ldap3 packs it as whole seconds
            )
        except LDAPBindError:
            return None
        except UNAVAILABLE as e:
            raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e
        except LDAPException as e:
            if "timeout" in type(e).__name__.lower() or "tls" in str(e).lower():
                raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e
            raise

    def _lookup(self, login: str) -> str | None:
        """Search-then-bind, step one: the DN of the one entry whose user_attribute equals ``login``."""
        conn = self.get_connection(self.lookup_dn_search_user, self.lookup_dn_search_password)
        if conn is None:
            raise ServiceAccountRefused(self.lookup_dn_search_user)
        try:
            conn.search(
                search_base=self.user_search_base,
                search_scope=ldap3.SUBTREE,
                search_filter=self.lookup_dn_search_filter.format(
                    login_attr=self.user_attribute, login=escape_filter_chars(login)
                ),
                attributes=[],
                size_limit=2,
            )
            entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
        finally:
            conn.unbind()
        if len(entries) != 1:
            if len(entries) > 1:
                self.log.error("looking up %s found several entries; refusing", signon.shown(login))
            return None
        return entries[0]["dn"]

    def _groups_of(self, conn: ldap3.Connection, user_dn: str) -> set[str]:
        """The configured groups (as configured: DN or cn) whose ``member`` holds ``user_dn``."""
        wanted = {*self.project_groups.values(), self.steward_group, self.admin_group} - {""}
        member_filter = f"(member={escape_filter_chars(user_dn)})"
        if self.group_base:
            searches = [(self.group_base, ldap3.SUBTREE)]
        else:
            searches = [(group, ldap3.BASE) for group in sorted(w for w in wanted if signon.is_dn(w))]
        found: list[str] = []
        for base, scope in searches:
            conn.search(base, member_filter, scope, attributes=["cn"])
            if conn.result.get("description") != "success":  # a group or group_base that is not there
                self.log.error("group search under %r failed: %s", base, conn.result.get("description"))
            found += [r["dn"] for r in conn.response or () if r.get("type") == "searchResEntry"]
        named = {w: dn for w in wanted if not signon.is_dn(w) and (dn := self._group_named(conn, w)) is not None}
        return signon.matching_groups(found, wanted, named)

    def _group_named(self, conn: ldap3.Connection, name: str) -> str | None:
        """The DN of the one group under ``group_base`` whose name is ``cn=<name>``; None (and an error in the
        log) when there is none, or several: a group configured by name then grants nothing until the
        operator gives its DN."""
        conn.search(self.group_base, f"(cn={escape_filter_chars(name)})", ldap3.SUBTREE, attributes=["cn"])
        entries = [r["dn"] for r in conn.response or () if r.get("type") == "searchResEntry"]
        dn, count = signon.group_named(name, entries)
        if count > 1:
            self.log.error(
                "%d groups under %s are named cn=%s; the one configured by that name grants nothing until its "
                "full DN is configured instead",
                count,
                self.group_base,
                name,
            )
        return dn

    def sign_in(self, login: str, password: str) -> Signed | None:
        """Blocking: bind as the user and read their groups. None when the credentials are refused.

        Raises :class:`DirectoryUnavailable` when the directory cannot be reached or stops answering.
        """
        try:
            return self._sign_in(login, password)
        except (*UNAVAILABLE, LDAPResponseTimeoutError) as e:
            raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e

    def _candidates(self, login: str) -> list[str]:
        """The DNs ``login`` may have under the bind-DN templates."""
        return [t.format(username=escape_rdn(login)) for t in self.bind_dn_template]

    def _existing(self, conn: ldap3.Connection, dns: list[str]) -> list[str]:
        """Those of ``dns`` that are entries ``conn`` can see."""
        return [dn for dn in dns if conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[])]

    def _active(self, conn: ldap3.Connection, dn: str) -> bool:
        """Whether the entry ``dn`` matches ``active_filter`` (a disabled account does not)."""
        if not self.active_filter:
            return True
        return bool(conn.search(dn, self.active_filter, ldap3.BASE, attributes=[]))

    def _ambiguous(self, login: str, found: list[str]) -> bool:
        """One login name, entries under several templates: both people would be one hub user, one system
        account and one home, with the first template's groups. Refused, for the operator to resolve."""
        if len(found) < 2:
            return False
        self.log.error(
            "%s has entries under %d bind_dn_templates (%s); refusing: make the templates' subtrees disjoint "
            "or use lookup_dn",
            signon.shown(login),
            len(found),
            "; ".join(found),
        )
        return True

    def _sign_in(self, login: str, password: str) -> Signed | None:
        if self.lookup_dn:
            dn = self._lookup(login)
            candidates = [dn] if dn else []
        else:
            candidates = self._candidates(login)
        for dn in candidates:
            conn = self.get_connection(dn, password)
            if conn is None:
                continue
            try:
                if len(candidates) > 1 and self._ambiguous(login, self._seen_by_service(candidates, conn)):
                    raise AccountRefused("a name under several bind_dn_templates")
                if not self._active(conn, dn):
                    raise AccountRefused("account not active (active_filter)")
                in_groups = self._groups_of(conn, dn)
            finally:
                conn.unbind()
            return Signed(
                dn=dn,
                membership=signon.membership(in_groups, self.project_groups, self.steward_group, self.admin_group),
            )
        return None

    def _seen_by_service(self, dns: list[str], fallback: ldap3.Connection) -> list[str]:
        """Those of ``dns`` that exist, as the service account sees the directory (or, without one, as the
        user's own connection does)."""
        if not self.lookup_dn_search_user:
            return self._existing(fallback, dns)
        conn = self.get_connection(self.lookup_dn_search_user, self.lookup_dn_search_password)
        if conn is None:
            raise ServiceAccountRefused(self.lookup_dn_search_user)
        try:
            return self._existing(conn, dns)
        finally:
            conn.unbind()

    # ------------------------------------------------------------------ JupyterHub hooks
    def get_handlers(self, app: Any) -> list[tuple[str, Any]]:
        """The login page, and the token routes that refuse researchers (:mod:`paitient.hub.tokens`),
        listed before JupyterHub's own handlers for the same routes."""
        from paitient.hub import tokens

        return [*tokens.handlers(), *super().get_handlers(app)]

    @property
    def throttle(self) -> signon.SignInThrottle:
        """Failed sign-ins per name (:class:`paitient.hub.signon.SignInThrottle`), made at the first use."""
        if getattr(self, "_throttle", None) is None:
            self._throttle = signon.SignInThrottle(self.failed_signins, self.failed_signin_pause)
        return self._throttle

    @property
    def refusals(self) -> signon.RefusalRecords:
        """How many refused sign-ins are recorded one by one (:class:`paitient.hub.signon.RefusalRecords`)."""
        if getattr(self, "_refusals", None) is None:
            self._refusals = signon.RefusalRecords(self.refusals_recorded)
        return self._refusals

    async def _refused(self, actor: str, reason: str) -> None:
        """Record a refused sign-in, or count it with the others of its minute past ``refusals_recorded``."""
        recorded, first_held = self.refusals.take()
        if recorded:
            await self._audit(actor, "denied", reason=reason)
        elif first_held:
            asyncio.get_running_loop().call_later(self.refusals.seconds_left(), self._start_recording_held)

    def _start_recording_held(self) -> None:
        # the task is kept until it is done: the loop holds only a weak reference to it
        self._recording_held = asyncio.ensure_future(self._record_held_refusals())

    async def _record_held_refusals(self) -> None:
        held = self.refusals.release()
        if held:
            self.log.warning("%d more sign-ins refused in a minute, recorded as one count", held)
            await self._audit(
                "system",
                "denied",
                reason=f"{held} more sign-ins refused within a minute (not recorded one by one)",
                refusals=held,
            )

    async def authenticate(self, handler: web.RequestHandler | None, data: dict[str, Any]) -> dict | None:
        raw = data.get("username", "")
        if handler is not None:
            # Judge the name as it was sent: the login form's handler has already turned control
            # characters into spaces and stripped them, which would make "alice\0" or " alice" pass.
            sent = handler.request.body_arguments.get("username") or handler.request.query_arguments.get("username")
            if sent:
                raw = sent[0].decode("utf-8", "replace")
        password = data.get("password") or ""
        actor = signon.actor_name(raw)
        problem = signon.username_problem(raw, allow_at=self._allow_at)
        if problem:
            self.log.warning("sign-in refused for %s: %s", signon.shown(raw), problem)
            await self._refused(actor, f"invalid username: {problem}")
            return None
        login = raw.lower()
        wait = self.throttle.wait(login)
        if wait:
            if self.throttle.first_refusal(login):
                self.log.warning("sign-in refused for %s: too many failed sign-ins", signon.shown(login))
                await self._refused(actor, "too many failed sign-ins (later attempts not recorded)")
            raise web.HTTPError(429, signon.throttled_message(wait))
        if not password.strip():
            self.log.warning("sign-in refused for %s: empty password", signon.shown(login))
            await self._refused(actor, "empty password")
            return None
        try:
            signed = await asyncio.get_running_loop().run_in_executor(None, self.sign_in, login, password)
        except DirectoryUnavailable as e:
            self.log.error("directory %s:%s unreachable: %s", self.server_address, self.server_port, e)
            await self._audit(actor, "error", reason="directory unreachable")
            raise web.HTTPError(503, signon.UNREACHABLE_MESSAGE) from None
        except ServiceAccountRefused as e:
            self.log.error("the directory refused the service account %r; check its password file", str(e))
            await self._audit(actor, "error", reason="service account refused")
            raise web.HTTPError(503, signon.SERVICE_ACCOUNT_MESSAGE) from None
        except AccountRefused as e:
            self.log.warning("sign-in refused for %s: %s", signon.shown(login), e)
            await self._refused(actor, str(e))
            return None
        if signed is None:
            self.throttle.failed(login)
            self.log.warning("sign-in refused for %s: wrong password or unknown user", signon.shown(login))
            await self._refused(actor, "wrong password or unknown user")
            return None
        self.throttle.succeeded(login)
        m = signed.membership
        if not m.may_sign_in:
            self.log.warning("sign-in refused for %s: in no paitient project", signon.shown(login))
            await self._audit(actor, "denied", reason="not a member of any project")
            raise web.HTTPError(403, signon.NO_PROJECT_MESSAGE)
        if m.admin_withheld:
            self.log.warning(
                "%s is in the admin group and in project(s) %s: signed in as a researcher, not a hub admin "
                "(the admin role opens every researcher's server); operate the workspace from an account of no "
                "project",
                signon.shown(login),
                ", ".join(m.projects),
            )
        return self._model(login, signed)

    def _model(self, name: str, signed: Signed) -> dict:
        m = signed.membership
        return {
            "name": name,
            "groups": list(m.projects),
            "roles": signon.hub_roles(m, self.steward_scopes, self.researcher_scopes),
            "admin": m.admin if self.admin_group else None,
            "auth_state": {
                "dn": signed.dn,
                "projects": list(m.projects),
                "roles": list(m.roles),
                "ldap_groups": list(m.groups),
            },
        }

    async def check_allowed(self, username: str, auth_model: dict | None = None) -> bool:
        state = (auth_model or {}).get("auth_state") or {}
        if state.get("projects") or {"steward", "admin"} & set(state.get("roles", ())):
            return True
        if await super().check_allowed(username, auth_model):
            return True
        await self._audit(username, "denied", reason="not allowed by the hub configuration")
        return False

    async def check_blocked_users(self, username: str, auth_model: dict | None = None) -> bool:
        if super().check_blocked_users(username, auth_model):
            return True
        await self._audit(username, "denied", reason="blocked by the hub configuration")
        return False

    async def run_post_auth_hook(self, handler: web.RequestHandler | None, auth_model: dict) -> dict:
        """Record the sign-in; without a record there is no sign-in."""
        auth_model = await super().run_post_auth_hook(handler, auth_model)
        state = auth_model.get("auth_state") or {}
        await self._audit(
            auth_model["name"],
            "ok",
            reason="signed in",
            projects=state.get("projects", []),
            roles=state.get("roles", []),
            must_record=True,
        )
        await self._record_roles(auth_model["name"], state.get("roles", []))
        await self._revoke_tokens(handler, auth_model)
        return auth_model

    async def _revoke_tokens(self, handler: web.RequestHandler | None, auth_model: dict) -> None:
        """An account that now holds the researcher role keeps no API token (:func:`paitient.hub.tokens.revoke_held`).
        A request made with one of the revoked tokens is refused here and now."""
        from jupyterhub import orm

        from paitient.hub import tokens

        held = {r.get("name") for r in auth_model.get("roles") or ()}
        db = getattr(handler, "db", None)
        if db is None or tokens.RESEARCHER_ROLE not in held:
            return
        user = orm.User.find(db, auth_model["name"])
        if user is None:
            return
        sent = handler.get_auth_token() if getattr(handler, "_token_authenticated", False) else None  # type: ignore[union-attr]
        current = orm.APIToken.find(db, sent) if sent else None
        gone = tokens.revoke_held(db, user)
        if not gone:
            return
        self.log.warning("revoked %d API token(s) of %s: researchers hold none", len(gone), signon.shown(user.name))
        await self._audit_revoked(user.name, [t.prefix for t in gone])
        if current is not None and any(t is current for t in gone):
            raise web.HTTPError(403, signon.NO_TOKENS_MESSAGE)

    async def _audit_revoked(self, name: str, prefixes: list[str], reason: str = "") -> None:
        if self.site is None:
            return
        from paitient.hub import tokens

        details = tokens.revoked_details(prefixes, reason or tokens.RESEARCHER_REASON)
        site = self.site
        # needs no record first: one the trail cannot take now waits for it (paitient.hub.records)
        await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: records.record(
                site, actor="system", action="auth.token", object=name, outcome="ok", details=details
            ),
        )

    def current_membership(self, username: str) -> Signed | None:
        """Blocking: the user's DN and membership as the directory has them now, read with the service
        account. None when the user is no longer in the directory."""
        conn = self.get_connection(self.lookup_dn_search_user, self.lookup_dn_search_password)
        if conn is None:
            raise ServiceAccountRefused(self.lookup_dn_search_user)
        try:
            if self.lookup_dn:
                dn = self._lookup(username)
            else:
                found = self._existing(conn, self._candidates(username))
                dn = None if self._ambiguous(username, found) else next(iter(found), None)
            if dn is None or not self._active(conn, dn):
                return None
            in_groups = self._groups_of(conn, dn)
        except (*UNAVAILABLE, LDAPResponseTimeoutError) as e:
            raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e
        finally:
            conn.unbind()
        return Signed(dn, signon.membership(in_groups, self.project_groups, self.steward_group, self.admin_group))

    async def refresh_user(self, user: Any, handler: web.RequestHandler | None = None) -> bool | dict:
        """Re-read projects and roles every ``auth_refresh_age`` seconds (needs a service account).

        A user removed from every project is signed out (False); changed groups and roles are applied.
        Without a service account, or while the directory is unreachable, the session stays as it is.
        """
        if not self.lookup_dn_search_user:
            return True
        try:
            signed = await asyncio.get_running_loop().run_in_executor(None, self.current_membership, user.name)
        except (DirectoryUnavailable, ServiceAccountRefused) as e:
            self.log.warning("could not refresh %s from the directory: %s", signon.shown(user.name), e)
            return True
        if signed is None or not signed.membership.may_sign_in:
            self.log.warning("%s lost access in the directory; signing out", signon.shown(user.name))
            await self._audit(user.name, "denied", reason="access withdrawn in the directory")
            await self._withdraw(user, handler)
            return False
        model = self._model(user.name, signed)
        await self._record_roles(user.name, model["auth_state"]["roles"])
        await self._revoke_tokens(handler, model)
        await self._narrow(user, handler, signed.membership)
        return model

    async def _narrow(self, user: Any, handler: web.RequestHandler | None, membership: Membership) -> None:
        """The directory took a project or a role from a user who may still sign in (a steward taken out of
        every project, a researcher out of one of hers, an admin out of the admin group). The accounts
        registry, which the launcher and the services read, was written at the server's start only: the
        server's next kernels had the project's data, and the services' pages the role, for as long as the
        user kept it running. The registry is narrowed to the directory's now (the account leaves the
        project's group), and a running server is stopped, which ends its kernels; the next start has what
        the directory grants."""
        site = self.site
        if site is None:
            return
        from paitient.hub.accounts import narrow_member

        # the roles the directory decides here: a hub admin named in the hub's own configuration stays one
        managed = {"researcher"}
        managed |= {"steward"} if self.steward_group else set()
        managed |= {"admin"} if self.admin_group else set()
        lost = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: narrow_member(
                site, user.name, projects=membership.projects, roles=membership.roles, managed=frozenset(managed)
            ),
        )
        if not lost:
            return
        self.log.warning("%s lost %s in the directory", signon.shown(user.name), ", ".join(lost))
        await self._audit(user.name, "denied", reason="access narrowed in the directory", lost=lost)
        await self._stop_server(user, handler, "access narrowed")

    async def _withdraw(self, user: Any, handler: web.RequestHandler | None) -> None:
        """The directory withdrew ``user``'s access: every token they hold is deleted (API tokens, their
        server's and the OAuth sign-ins of their server and the services), so neither a script nor the
        server accepts them any longer, and their running server is stopped, which ends its kernels. With
        ``auth_refresh_strict`` (:func:`configure_from_site`) the request that found it is refused too."""
        from paitient.hub import tokens

        await self._record_roles(user.name, [])
        orm_user = getattr(user, "orm_user", None)
        db = getattr(user, "db", None)
        if orm_user is not None and db is not None:
            gone = tokens.revoke_all(db, orm_user)
            if gone:
                self.log.warning("revoked %d token(s) of %s: access withdrawn", len(gone), signon.shown(user.name))
                await self._audit_revoked(user.name, [t.prefix for t in gone], tokens.WITHDRAWN_REASON)
        await self._stop_server(user, handler, "access withdrawn")

    async def _stop_server(self, user: Any, handler: web.RequestHandler | None, why: str) -> None:
        """Stop ``user``'s running server (which ends its kernels), off the proxy first where a request is
        being handled."""
        spawner = getattr(user, "spawners", {}).get("")
        if spawner is None or not spawner.active or spawner.pending:
            return
        self.log.warning("stopping the server of %s: %s", signon.shown(user.name), why)
        try:
            if handler is not None and hasattr(handler, "stop_single_user"):
                await handler.stop_single_user(user, "")  # off the proxy, then stopped
            else:
                await user.stop("")
        except Exception as e:  # its tokens are gone already: the server accepts no request
            self.log.error("could not stop the server of %s: %s", signon.shown(user.name), e)

    async def _record_roles(self, name: str, roles: list[str]) -> None:
        """Keep the directory-managed roles a hub restart gives back (:mod:`paitient.hub.roleholders`) as the
        directory has them now, not as at the latest sign-in."""
        if self.site is None:
            return
        from paitient.hub import roleholders

        await asyncio.get_running_loop().run_in_executor(None, roleholders.record, self.site.state_dir, name, roles)

    async def load_managed_roles(self) -> list[dict]:
        specs = signon.role_specs(self.steward_scopes, self.researcher_scopes)
        if self.site is not None:
            from paitient.hub import roleholders

            held = roleholders.holders(self.site.state_dir)
            for name, spec in specs.items():
                spec["users"] = held.get(name, [])
        return list(specs.values())

    async def _audit(self, actor: str, outcome: str, *, must_record: bool = False, **details: Any) -> None:
        try:
            if self.site is None:
                raise RuntimeError("no site configuration given to the authenticator (c.<class>.site)")
            site = self.site
            # a sign-in is recorded before it happens; a refusal's record waits for the trail if it must
            await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: records.record(
                    site, required=must_record, actor=actor, action="auth.login", outcome=outcome, details=details
                ),
            )
        except Exception as e:
            self.log.error("audit record auth.login (%s) for %s not written: %s", outcome, signon.shown(actor), e)
            if must_record:
                raise web.HTTPError(503, signon.AUDIT_MESSAGE) from None


# ---------------------------------------------------------------------- configuration from the site file
def configure_from_site(c: Any, site: SiteConfig, directory_url: str | None = None) -> None:
    """Set the authenticator's traitlets on JupyterHub config ``c`` from ``site``.

    ``directory_url`` is the embedded demo directory's URL when ``site.directory.url`` is empty.
    """
    d = site.directory
    url = directory_url or d.url
    if not url:
        raise ConfigError("the site names no directory url; start the embedded directory and pass its url")
    from urllib.parse import urlparse

    tls = signon.tls_choice(d, url)
    names = [p.group for p in site.projects if not signon.is_dn(p.group)]
    if names and not d.group_base:
        raise ConfigError(
            f"[projects] group(s) {', '.join(names)} are plain names: set [directory] group_base "
            "so they can be found, or give full DNs"
        )
    a = c.PaitientLDAPAuthenticator
    c.JupyterHub.authenticator_class = "paitient-ldap"
    a.server_address = urlparse(url).hostname
    a.server_port = tls.port
    a.tls_strategy = tls.strategy
    a.tls_kwargs = tls.tls_kwargs
    a.timeout = d.timeout
    a.active_filter = d.active_filter
    a.failed_signins = int(d.failed_signins)
    a.failed_signin_pause = float(d.failed_signin_pause)
    a.refusals_recorded = int(d.refusals_recorded)
    a.auth_refresh_age = int(d.refresh_seconds)
    # A refresh that finds access withdrawn refuses token requests too (JupyterHub's default keeps them).
    a.auth_refresh_strict = True
    a.lookup_dn = d.lookup_dn
    if d.lookup_dn:
        a.user_search_base = d.search_base
        a.user_attribute = d.user_attribute
        a.lookup_dn_user_dn_attribute = d.user_attribute
    else:
        a.bind_dn_template = list(d.bind_dn_template)
    # The service account searches for users (lookup_dn) and re-reads memberships (refresh_user).
    service_dn, service_file = d.service_dn, d.service_password_file
    if d.embedded and not service_dn:
        from paitient.hub.paths import EMBEDDED_SERVICE_DN, HubPaths

        embedded_file = HubPaths.of(site).embedded_service_password_file
        if embedded_file.is_file():
            service_dn, service_file = EMBEDDED_SERVICE_DN, str(embedded_file)
    a.lookup_dn_search_user = service_dn or None
    if service_file:
        path = Path(service_file)
        if not path.is_file():
            raise ConfigError(
                f"[directory] service_password_file {path} does not exist; write the service "
                "account's password there (owner root, mode 0600)"
            )
        check_owner(path, secret=True)
        a.service_password_file = service_file
    a.project_groups = {p.name: p.group for p in site.projects}
    a.steward_group = d.steward_group
    a.admin_group = d.admin_group
    a.group_base = d.group_base
    a.allowed_groups = sorted({p.group for p in site.projects} | ({d.steward_group} - {""}))
    a.site = site
    from paitient.services.audit.service import custom_scopes

    scopes = dict(c.JupyterHub.custom_scopes) if "custom_scopes" in c.JupyterHub else {}
    c.JupyterHub.custom_scopes = {**scopes, **custom_scopes()}
