"""Where signing in lands: researchers in their own JupyterLab, stewards at the airlock's review page.

:func:`default_url` is ``JupyterHub.default_url``: the hub asks it where to send a user who signed in (or
opened the workspace's address) without asking for a page of their own. For a researcher it answers
nothing, and JupyterHub goes on to the user's server (``redirect_to_server``): a running one directly, a
stopped one through ``/hub/spawn``, which starts it and shows its progress page until it is ready; the
server opens at ``/lab`` (``Spawner.default_url``). Nothing waits on a "Start My Server" button.

A steward may belong to no project and have no use for a server: they land where they work, the airlock
(its list shows the requests they may review). Anyone else signed in (an admin in no project) lands on
the hub's home page.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from jupyterhub import roles
from jupyterhub.utils import url_path_join

REVIEW_SERVICE = "airlock"


def landing(held_roles: Collection[str], *, hub_prefix: str, review_prefix: str | None) -> str:
    """Where a user holding ``held_roles`` lands; empty: their own server (JupyterHub's default path).

    ``review_prefix`` is the airlock service's URL prefix (None when the hub runs no airlock)."""
    if "researcher" in held_roles:
        return ""
    if "steward" in held_roles and review_prefix:
        return review_prefix
    return url_path_join(hub_prefix, "home")


def default_url(handler: Any) -> str:
    """``JupyterHub.default_url`` for paitient: :func:`landing` for the signed-in user of ``handler``."""
    user = handler.current_user
    if user is None:
        return ""  # not signed in: the hub sends them to the login form, and back here afterwards
    held = {role.name for role in roles.get_roles_for(user.orm_user)}
    service = handler.services.get(REVIEW_SERVICE)
    # the service's own origin where it has one (JupyterHub's `href` would leave out a port)
    review = (service.host + service.prefix) if service and service.host else (service.prefix if service else None)
    return landing(held, hub_prefix=handler.hub.base_url, review_prefix=review)
