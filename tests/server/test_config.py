"""The root-owned configuration of a user's server, as the spawner writes it."""

import json
import os
import stat
from pathlib import Path

from paitient.config import parse
from paitient.hub.serverconfig import (
    DISABLED_LAB_PLUGINS,
    KERNEL_NAME,
    kernel_spec,
    member_datasets,
    server_config,
    user_server_env,
    write_user_server_config,
)
from paitient.registry import Member

REPO = Path(__file__).resolve().parents[2]


def site(tmp_path):
    return parse(
        {
            "workspace": {"state_dir": str(tmp_path / "state")},
            "sandbox": {"memory_mb": 2048, "cpu_seconds": 600},
            "server": {"output_cap_message_bytes": 1234, "output_cap_execution_bytes": 5678},
            "projects": [
                {"name": "onc", "group": "g1", "datasets": ["bc", "gbsg"]},
                {"name": "card", "group": "g2", "datasets": ["dia"]},
            ],
        }
    )


def member(projects=("onc",)):
    return Member(username="alice", account="root", uid=0, projects=projects)


def test_member_datasets_only_known_projects(tmp_path):
    assert member_datasets(site(tmp_path), member(("onc", "gone"))) == {"onc": ["bc", "gbsg"]}


def test_server_config_carries_the_policy(tmp_path):
    s = site(tmp_path)
    cfg = server_config(
        s, member(), "/home/pt-alice", "/state/users/pt-alice/jupyter/data", "/state/users/pt-alice/jupyter/state"
    )
    app = cfg["ServerApp"]
    assert app["terminals_enabled"] is False and app["reraise_server_extension_failures"] is True
    assert app["jpserver_extensions"]["paitient.server"] is True
    assert app["jpserver_extensions"]["jupyter_server_terminals"] is False
    assert app["kernel_websocket_connection_class"].endswith("CappedWebsocketConnection")
    assert cfg["KernelProvisionerFactory"]["default_provisioner_name"] == "paitient-sandbox"
    assert cfg["KernelSpecManager"] == {"ensure_native_kernel": False, "allowed_kernelspecs": [KERNEL_NAME]}
    assert cfg["SandboxKernelSpecManager"]["sandbox_kernel_dirs"] == ["/state/users/pt-alice/jupyter/data/kernels"]
    assert cfg["KernelManager"]["transport"] == "ipc"
    assert cfg["ContentsManager"]["allow_hidden"] is False
    prov = cfg["SandboxProvisioner"]
    assert prov["projects"] == {"onc": ["bc", "gbsg"]} and prov["memory_mb"] == 2048 and prov["cpu_seconds"] == 600
    assert prov["run_dir"] == str(s.run_dir) and prov["data_root"] == str(s.data_root)
    assert cfg["ConfinedContentsManager"]["max_content_bytes"] == s.server.contents_cap_bytes
    ws = cfg["CappedWebsocketConnection"]
    assert (ws["output_cap_message_bytes"], ws["output_cap_execution_bytes"]) == (1234, 5678)
    assert cfg["LabApp"]["user_settings_dir"] == "/state/users/pt-alice/jupyter/state/lab/user-settings"
    assert cfg["NotebookNotary"]["data_dir"] == "/state/users/pt-alice/jupyter/state/notary"
    assert cfg["LabApp"]["extension_manager"] == "readonly" and cfg["LabApp"]["news_url"] is None


def test_written_files_are_root_owned_and_not_writable_by_others(tmp_path):
    cdir, ddir = tmp_path / "cfg", tmp_path / "data"
    (ddir / "kernels" / "planted").mkdir(parents=True)
    write_user_server_config(site(tmp_path), member(), cdir, ddir)
    files = [
        cdir / "jupyter_server_config.json",
        cdir / "labconfig" / "page_config.json",
        cdir / "migrated",
        ddir / "kernels" / KERNEL_NAME / "kernel.json",
    ]
    for f in files:
        st = f.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644, f
    for d in (cdir, cdir / "labconfig", ddir, ddir / "kernels", ddir / "kernels" / KERNEL_NAME):
        st = d.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755, d
    assert os.listdir(ddir / "kernels") == [KERNEL_NAME]
    for d in ("state", "state/lab", "state/notary"):  # owned by the member's account (root here), private
        st = (tmp_path / d).stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    assert json.loads((ddir / "kernels" / KERNEL_NAME / "kernel.json").read_text()) == kernel_spec()
    disabled = json.loads((cdir / "labconfig" / "page_config.json").read_text())["disabledExtensions"]
    assert set(disabled) == set(DISABLED_LAB_PLUGINS)


def test_a_symlinked_spec_dir_is_replaced(tmp_path):
    cdir, ddir = tmp_path / "cfg", tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (ddir / "kernels").mkdir(parents=True)
    (ddir / "kernels" / KERNEL_NAME).symlink_to(elsewhere)
    write_user_server_config(site(tmp_path), member(), cdir, ddir)
    assert not (ddir / "kernels" / KERNEL_NAME).is_symlink()
    assert list(elsewhere.iterdir()) == []


def test_links_the_account_puts_in_its_state_folder_hand_it_nothing(tmp_path):
    """Attack: the account owns ``state`` (its server writes there) and replaces ``state/lab`` with a link to
    a folder of root's and ``state/notary`` with a link to another. The spawner, as root, made
    each folder the account's by path before every start, following the links: the folder became the
    account's (0700), and with it whatever root keeps there (``/etc``). Now each is changed through a
    descriptor opened without following links, and what the account put in their place is replaced."""
    import pwd
    import subprocess

    pw = pwd.getpwnam("nobody")
    os.chmod(tmp_path, 0o755)
    user_dir = tmp_path / "users" / "nobody"
    cdir, ddir = user_dir / "config", user_dir / "data"
    user_dir.mkdir(parents=True)
    os.chmod(tmp_path / "users", 0o755)
    os.chown(user_dir, 0, pw.pw_gid)
    os.chmod(user_dir, 0o750)
    account = Member(username="alice", account="nobody", uid=pw.pw_uid, projects=("onc",))
    write_user_server_config(site(tmp_path), account, cdir, ddir)
    roots = tmp_path / "roots"
    (roots / "sub").mkdir(parents=True)
    (roots / "file").write_text("root's\n")
    for path, mode in ((roots, 0o755), (roots / "sub", 0o755), (roots / "file", 0o644)):
        os.chmod(path, mode)
    state = user_dir / "state"
    plant = f"rm -r lab notary && ln -s {roots} lab && ln -s {roots}/sub notary"
    as_account = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "sh", "-c"]
    subprocess.run([*as_account, plant], check=True, cwd=state)  # the test's folders above are root's 0700
    assert (state / "lab").is_symlink() and (state / "notary").is_symlink()

    write_user_server_config(site(tmp_path), account, cdir, ddir)

    for path in (roots, roots / "sub", roots / "file"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
        assert stat.S_IMODE(st.st_mode) in (0o755, 0o644), oct(st.st_mode)
    for name in ("lab", "notary"):
        st = os.lstat(state / name)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, (name, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid), name
    r = subprocess.run([*as_account, "rm -f file && echo theirs > file"], capture_output=True, text=True, cwd=roots)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    assert (roots / "file").read_text() == "root's\n"


def test_shipped_kernel_spec_is_the_generated_one():
    shipped = json.loads((REPO / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert shipped == kernel_spec("/opt/paitient/venv/bin/python")
    assert shipped["interrupt_mode"] == "message"


def test_lab_plugins_to_disable_exist_in_the_installed_jupyterlab():
    import sys

    schemas = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"
    for plugin in DISABLED_LAB_PLUGINS:
        package, _, name = plugin.partition(":")
        assert (schemas / package).is_dir(), plugin
        if name:
            assert (schemas / package / f"{name}.json").is_file(), plugin


def test_server_env_points_jupyter_at_the_root_owned_dirs():
    env = user_server_env("/s/config", "/s/data", "/home/a")
    assert env["JUPYTER_CONFIG_DIR"] == "/s/config" and env["JUPYTER_DATA_DIR"] == "/s/data"
    assert env["JUPYTER_RUNTIME_DIR"] == "/home/a/.local/share/jupyter/runtime"
    assert env["JUPYTER_PREFER_ENV_PATH"] == "0"
