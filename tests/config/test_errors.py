"""Errors of the site file name the file, the table, the key and what is allowed."""

from pathlib import Path

import pytest

from paitient.config import ConfigError, load, parse


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "toml, message",
    [
        (
            "[server]\noutput_cap_message_bytes = -1\n",
            "[server] output_cap_message_bytes: must be a positive whole number, got -1",
        ),
        ("[server]\nidle_timeout = -5\n", "[server] idle_timeout: must be 0 (never) or a number of seconds, got -5"),
        ("[server]\ncull_timeout = 30\n", "[server] cull_timeout: must be 0 (off) or at least 60 seconds, got 30"),
        ("[server]\ncull_timeout = -1\n", "[server] cull_timeout: must be 0 (off) or at least 60 seconds, got -1"),
        ("[server]\ncull_timeout = 1.5\n", "[server] cull_timeout: expected a whole number, got 1.5"),
        ("[workspace]\nport = true\n", "[workspace] port: expected a whole number, got True"),
        ("[workspace]\nstate_dir = 'var/lib'\n", "[workspace] state_dir: must be an absolute path, got 'var/lib'"),
        (
            "[workspace]\nspawner = 'kubernetes'\n",
            "[workspace] spawner: expected one of 'paitient-local', 'paitient-docker', 'local', 'docker', got "
            "'kubernetes'",
        ),
        ("[directory]\ntls = 'maybe'\n", "[directory] tls: expected one of 'auto', 'starttls', 'ldaps', 'none', got"),
        ("[directory]\nlookup_dn = 'yes'\n", "[directory] lookup_dn: expected true or false, got 'yes'"),
        ("[directory]\nbind_dn_template = [1]\n", "[directory] bind_dn_template: expected a list of strings, got [1]"),
        ("[directory]\ntimeout = 0\n", "[directory] timeout: must be seconds between 0 and 120, got 0.0"),
        ("[sandbox]\ncpu_seconds = -1\n", "[sandbox] cpu_seconds: must be 0 (no limit) or a positive number"),
        ("[audit]\nrotate_bytes = 100\n", "[audit] rotate_bytes: must be at least 4096, got 100"),
        ("[airlock]\nmia_max_auc = 0.5\n", "[airlock] mia_max_auc: must lie in (0.5, 1] (0.5 is guessing), got 0.5"),
        ("[airlock]\nnk_k = 'high'\n", "[airlock] nk_k: expected a number, got 'high'"),
        ("[egress]\ndaily_bytes = 0\n", "[egress] daily_bytes: must be a positive whole number, got 0"),
        ("[egress]\ndaily_rows = -1\n", "[egress] daily_rows: must be 0 or a positive whole number, got -1"),
        ("[egress]\nrows = 1\n", "[egress] unknown key 'rows'; known keys: contents_bytes, daily_bytes, daily_rows,"),
        ("server = 5\n", "server: expected a table, got 5"),
        ("projects = 5\n", "projects: expected an array of tables, got 5"),
        (
            "[[projects]]\nname = 'onc'\ngroup = 'g'\nbudget = { epsilon = 0 }\n",
            "[projects.onc.budget] epsilon: must be positive and finite, got 0.0",
        ),
        (
            "[[projects]]\nname = 'onc'\ngroup = 'g'\ndatasets = ['bc']\nbudgets = { bc = { delta = 2 } }\n",
            "[projects.onc.budgets.bc] delta: must lie between 0 and 1, got 2.0",
        ),
        (
            "[[projects]]\nname = 'onc'\ngroup = 'g'\negress = { daily_rows = -3 }\n",
            "[projects.onc.egress] daily_rows: must be 0 or a positive whole number, got -3",
        ),
        (
            "[[projects]]\nname = 'onc'\ngroup = 'g'\negress = { rows = 3 }\n",
            "[projects.onc.egress] unknown key 'rows'; known keys:",
        ),
        ("[[projects]]\ngroup = 'g'\napprovals = 3\n", "[[projects]] entry 0 approvals: must be 1 or 2, got 3"),
        ("[[projects]]\nname = 'onc'\ngroup = 'g'\nowner = 'x'\n", "[projects.onc] unknown key 'owner'; known keys:"),
        ("[[projects]]\nname = 'onc'\n", "[projects.onc] 'group' is required"),
    ],
)
def test_the_error_names_file_key_and_what_is_allowed(tmp_path, toml, message):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def test_unknown_keys_list_the_known_ones_and_unknown_sections_the_sections(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, "[server]\noutput_cap = 1\n"))
    assert str(e.value) == (
        f"{tmp_path / 'site.toml'}: [server] unknown key 'output_cap'; known keys: contents_cap_bytes, "
        "cull_timeout, idle_timeout, output_cap_execution_bytes, output_cap_message_bytes"
    )
    with pytest.raises(ConfigError, match=r"unknown section\(s\) egres; sections: workspace, .*egress, airlock"):
        load(write(tmp_path, "[egres]\n"))


def test_the_file_is_named_as_given(tmp_path, monkeypatch):
    write(tmp_path, "[sandbox]\nmemory_mb = 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"^site.toml: \[sandbox\] memory_mb: must be a positive whole number, got 0$"
    ):
        load("site.toml")


def test_an_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    path = write(tmp_path, "[workspace]\nport = 8000\n")
    with pytest.raises(ConfigError, match=r"^override: \[workspace\] port: not a usable port: 0 \(allowed: 1 to 65535"):
        load(path, overrides={"workspace": {"port": 0}})
    with pytest.raises(ConfigError, match=r"^override: \[sandbox\] memory_mb: must be a positive whole number"):
        load(None, overrides={"sandbox": {"memory_mb": 0}})
    assert load(path, overrides={"workspace": {"port": 8123}}).workspace.port == 8123


def test_cross_field_rules_name_their_keys():
    with pytest.raises(ConfigError, match=r"\[directory\] search_base: lookup_dn = true needs search_base"):
        parse({"directory": {"url": "ldaps://dc1.hospital.example", "lookup_dn": True}})
    with pytest.raises(ConfigError, match=r"\[projects.onc\] budgets: 'x' is not one of the project's datasets \(bc\)"):
        parse({"projects": [{"name": "onc", "group": "g", "datasets": ["bc"], "budgets": {"x": {}}}]})
