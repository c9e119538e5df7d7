"""The hub's own database: SQLite under the state directory, or the schema ``hub`` of ``[database] url``,
where JupyterHub makes its tables itself."""

import tomllib

import psycopg
import pytest
from jupyterhub import orm
from traitlets.config import Config

from paitient.config import EMBEDDED_SITE, parse
from paitient.hub.hubconfig import configure
from paitient.services.kit.db import DatabaseError


def hub_config(tmp_path, database):
    raw = tomllib.loads(EMBEDDED_SITE.read_text())
    raw["workspace"]["state_dir"] = str(tmp_path / "state")
    (tmp_path / "state" / "hub").mkdir(parents=True)
    site = parse({**raw, "database": database})
    return configure(Config(), site, directory_url="ldap://127.0.0.1:3890/", hub_port=1, proxy_api_port=2)


def test_without_a_url_the_hub_keeps_its_sqlite_file(tmp_path):
    assert hub_config(tmp_path, {}).JupyterHub.db_url == f"sqlite:///{tmp_path}/state/hub/jupyterhub.sqlite"


def test_the_hub_makes_its_tables_in_its_own_schema(tmp_path, postgres_db):
    url = hub_config(tmp_path, postgres_db.site_table()).JupyterHub.db_url
    assert url.startswith("postgresql+psycopg://paitient@/") and "search_path%3Dhub" in url
    session = orm.new_session_factory(url)()  # as JupyterHub opens it at start
    session.add(orm.User(name="alice"))
    session.commit()
    session.close()
    with psycopg.connect(postgres_db.url, passfile=postgres_db.passfile) as conn:
        assert conn.execute("SELECT name FROM hub.users").fetchall() == [("alice",)]
        assert conn.execute("SELECT COUNT(*) FROM hub.alembic_version").fetchone() == (1,)
        public = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        assert public.fetchall() == []


def test_an_unreachable_server_stops_the_hub_with_the_reason(tmp_path):
    database = {"url": f"postgresql://paitient@/paitient?host={tmp_path}"}
    with pytest.raises(DatabaseError, match="the hub database .* cannot be reached: .*Check \\[database\\] url"):
        hub_config(tmp_path, database)
