# JupyterHub configuration for operators who run the hub themselves:
#
#     PAITIENT_SITE=/etc/paitient/site.toml jupyterhub -f hub_config/jupyterhub_config.py
#
# `paitient up` applies the same policy (paitient.hub.hubconfig.configure) and runs the proxy and the
# embedded directory itself; here the directory must be named in the site configuration, and the hub
# starts the proxy. Two things JupyterHub's own hub class cannot do are left to `paitient up`'s: answering the
# hub's pages on its own host only, which [workspace] subdomain_host needs (so that setting is refused here),
# and revoking at start any API token a researcher holds (each is revoked at her next sign-in or refresh).
import os

from paitient import config as site_config
from paitient.hub.hubconfig import configure

c = get_config()  # noqa: F821 - provided by JupyterHub when it reads this file
site = site_config.load(os.environ.get("PAITIENT_SITE") or None)
if site.directory.embedded:
    raise SystemExit(
        "hub_config/jupyterhub_config.py needs a directory: set [directory] url in the site "
        "configuration, or use `paitient up`, which runs the embedded demo directory"
    )
if site.workspace.subdomain_host:
    raise SystemExit(
        "hub_config/jupyterhub_config.py cannot serve [workspace] subdomain_host: JupyterHub's own hub answers "
        "its pages on every user's host, where a page of the user's could act as a steward who signed in there. "
        "Start with `paitient up`, whose hub answers on its own host only, or leave subdomain_host empty"
    )
configure(
    c,
    site,
    directory_url=site.directory.url,
    hub_port=site.workspace.hub_port or 8081,
    proxy_api_port=site.workspace.proxy_api_port or 8001,
)
c.ConfigurableHTTPProxy.should_start = True
