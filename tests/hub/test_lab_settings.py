"""JupyterLab's news question is off by default for every user, set in the server's root-owned data dir."""

import json
import stat
import sys
from pathlib import Path

from jupyterlab_server.settings_utils import get_settings

from paitient.config import EMBEDDED_SITE, parse
from paitient.hub.serverconfig import LAB_SETTING_OVERRIDES, lab_settings_dir, server_config, write_user_server_config
from paitient.registry import Member

NOTIFICATION = "@jupyterlab/apputils-extension:notification"
SCHEMAS = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"


def demo_site(tmp_path):
    import tomllib

    raw = tomllib.loads(EMBEDDED_SITE.read_text())
    raw["workspace"]["state_dir"] = str(tmp_path / "state")
    return parse(raw)


def test_the_servers_lab_reads_its_settings_overrides_from_the_root_owned_data_dir(tmp_path):
    member = Member(username="alice", account="root", uid=0, projects=("oncology",))
    cfg = server_config(demo_site(tmp_path), member, "/home/pt-alice", "/state/users/pt-alice/data", "/state/x")
    assert cfg["LabApp"]["app_settings_dir"] == lab_settings_dir("/state/users/pt-alice/data")
    assert lab_settings_dir("/d") == "/d/lab/settings"


def test_written_overrides_turn_the_news_question_off_as_lab_resolves_them(tmp_path):
    cdir, ddir = tmp_path / "cfg", tmp_path / "data"
    member = Member(username="alice", account="root", uid=0, projects=("oncology",))
    write_user_server_config(demo_site(tmp_path), member, cdir, ddir)
    settings_dir = Path(lab_settings_dir(ddir))
    overrides = settings_dir / "overrides.json"
    assert json.loads(overrides.read_text()) == LAB_SETTING_OVERRIDES
    for path, mode in ((overrides, 0o644), (settings_dir, 0o755), (settings_dir.parent, 0o755)):
        st = path.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == mode, path
    # JupyterLab's own settings code, on the installed schemas, with a user who never chose
    user_settings = tmp_path / "user-settings"
    user_settings.mkdir()
    setting, warnings = get_settings(str(settings_dir), str(SCHEMAS), str(user_settings), schema_name=NOTIFICATION)
    assert not [w for w in warnings if w]
    props = setting["schema"]["properties"]
    assert props["fetchNews"]["default"] == "false" and props["checkForUpdates"]["default"] is False
    assert setting["settings"] == {}
    # "false" is one of the values the installed schema accepts ("none" is the one that asks)
    assert {"const": "false", "title": "Never"} in props["fetchNews"]["oneOf"]
