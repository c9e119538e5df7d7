"""Zone ``paitient.hub``: the hub's configuration.

Process: JupyterHub (``paitient hub``, or ``jupyterhub`` with ``hub_config/jupyterhub_config.py``).
User: root. Trusted for: who signs in (:mod:`.auth`, :mod:`.signon`), which account and projects they get
(:mod:`.accounts`, :mod:`.naming`), and how their server starts (:mod:`.spawner`, whose configuration
:mod:`.serverconfig` writes into root-owned folders).
"""
