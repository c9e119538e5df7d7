"""Bypass attempts: everything the user controls (specs, config, startup files, site-packages, environment)
is tried against a real server, and every kernel still ends up in the sandbox with the site's policy."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from paitient.rules.sandbox import KERNEL_MODULE
from tests.server.harness import UserServer

EVIL_SO = r"""
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    char buf[4096];
    int fd = open("/proc/self/cmdline", O_RDONLY);
    ssize_t n = fd < 0 ? 0 : read(fd, buf, sizeof buf - 2);
    if (fd >= 0) close(fd);
    for (ssize_t i = 0; i < n; i++) if (buf[i] == 0) buf[i] = ' ';
    buf[n > 0 ? n : 0] = '\n';
    int out = open(MARKER, O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (out >= 0) { write(out, buf, (n > 0 ? n : 0) + 1); close(out); }
}
"""

IN_SANDBOX = (
    "import socket, os\n"
    "print('NET', [i for _, i in socket.if_nameindex()], len(open('/proc/net/route').read().splitlines()) - 1)\n"
    "print('PID1', open('/proc/1/cmdline','rb').read().split(b'\\0')[0].decode())\n"
)


def _in_sandbox(res) -> bool:
    return "NET ['lo'] 0" in res.stdout and "PID1 /usr/bin/bwrap" in res.stdout


def _own(path: Path, user) -> None:
    for p in [path, *path.parents]:
        if p == Path(user.pw_dir):
            break
        os.lchown(p, user.pw_uid, user.pw_gid)


def _write(user, rel: str, text: str) -> Path:
    path = Path(user.pw_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    _own(path, user)
    return path


def _evil_so(user) -> tuple[Path, Path]:
    marker = Path(user.pw_dir) / "preload-marker.txt"
    src = _write(user, "evil.c", EVIL_SO)
    so = Path(user.pw_dir) / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(so), str(src)], check=True)
    os.chmod(so, 0o755)
    os.chown(so, user.pw_uid, user.pw_gid)
    return so, marker


def test_unknown_spec_name_is_refused_and_starts_nothing(world):
    before = world.server_a.get("/api/kernels").json()
    r = world.server_a.request("POST", "/api/kernels", json={"name": "native-python"})
    assert r.status_code == 404 and "sandbox" in r.json()["message"], (r.status_code, r.text[:300])
    assert world.server_a.get("/api/kernels").json() == before


def test_session_with_another_spec_name_is_refused(world):
    r = world.server_a.request(
        "POST",
        "/api/sessions",
        json={"path": "x.ipynb", "type": "notebook", "name": "x", "kernel": {"name": "python3-native"}},
    )
    assert r.status_code == 501 and "python3-native" in r.json()["message"], (r.status_code, r.text[:300])
    assert all(s["path"] != "x.ipynb" for s in world.server_a.get("/api/sessions").json())


def test_the_spec_named_by_the_environment_is_sandboxed_too(world, alice_kernel):
    # The Python environment ships an unsandboxed "python3" spec; the server never reads it.
    res = world.server_a.run(IN_SANDBOX, world.server_a.start_kernel("python3"))
    assert _in_sandbox(res), res


def test_user_kernel_specs_cannot_replace_or_add_kernels(world, make_system_user):
    user = make_system_user("specs")
    marker = Path(user.pw_dir) / "spec-marker.txt"
    evil = {
        "argv": [
            "/bin/sh",
            "-c",
            f"echo ran > {marker}; exec /opt/paitient/venv/bin/python -m ipykernel_launcher -f {{connection_file}}",
        ],
        "display_name": "open",
        "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "local-provisioner"}},
    }
    for rel in (
        ".local/share/jupyter/kernels/python3",
        ".local/share/jupyter/kernels/open",
        ".ipython/kernels/python3",
        ".ipython/kernels/open",
    ):
        _write(user, f"{rel}/kernel.json", json.dumps(evil))
    with UserServer(world.site, user, ("onc",), world.root) as server:
        specs = server.get("/api/kernelspecs").json()["kernelspecs"]
        assert list(specs) == ["python3"] and specs["python3"]["spec"]["display_name"] == "Python 3 (sandbox)"
        r = server.request("POST", "/api/kernels", json={"name": "open"})
        assert r.status_code == 404, r.text[:300]
        res = server.run(IN_SANDBOX, server.start_kernel("python3"))
    assert _in_sandbox(res), res
    assert not marker.exists()


def test_user_jupyter_config_cannot_reopen_the_server(world, make_system_user):
    user = make_system_user("config")
    marker = Path(user.pw_dir) / "config-marker.txt"
    open_config = {
        "ServerApp": {
            "terminals_enabled": True,
            "jpserver_extensions": {"paitient.server": False, "jupyter_server_terminals": True},
            "kernel_manager_class": "jupyter_server.services.kernels.kernelmanager.AsyncMappingKernelManager",
        },
        "KernelProvisionerFactory": {"default_provisioner_name": "local-provisioner"},
        "KernelSpecManager": {"ensure_native_kernel": True},
        "ContentsManager": {"allow_hidden": True},
    }
    for name in ("jupyter_server_config.json", "jupyter_config.json", "jupyter_lab_config.json"):
        _write(user, f".jupyter/{name}", json.dumps(open_config))
    _write(user, ".jupyter/jupyter_server_config.py", f"open({str(marker)!r}, 'w').write('ran')\n")
    with UserServer(world.site, user, ("onc",), world.root) as server:
        assert server.get("/api/terminals").status_code == 404
        assert server.get("/files/x").status_code == 403
        res = server.run(IN_SANDBOX)
    assert _in_sandbox(res), res
    assert not marker.exists()


def test_ipython_startup_files_run_only_inside_the_sandbox(world):
    user = world.alice
    port = world.listeners.port("hub")
    result = Path(user.pw_dir) / "startup-result.txt"
    startup = _write(
        user,
        ".ipython/profile_default/startup/00-planted.py",
        textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=3)
            outcome = "connected"
        except OSError as e:
            outcome = f"refused {{e.errno}}"
        try:
            open({str(world.secrets["site_config"])!r}).read(); outcome += " site-read"
        except OSError as e:
            outcome += f" site {{e.errno}}"
        open({str(result)!r}, "w").write(outcome)
    """),
    )
    try:
        world.server_a.run("1", world.server_a.start_kernel())
        assert result.read_text() == "refused 111 site 2"
    finally:
        startup.unlink()
        result.unlink(missing_ok=True)
    assert world.listeners.nothing_arrived()


def test_user_site_packages_and_home_customisation_are_not_loaded(world, make_system_user):
    user = make_system_user("site")
    marker = Path(user.pw_dir) / "site-marker.txt"
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    site_dir = ".local/lib/python3.11/site-packages"
    _write(user, f"{site_dir}/usercustomize.py", code)
    _write(user, f"{site_dir}/sitecustomize.py", code)
    _write(user, f"{site_dir}/zz_planted.pth", f"import os; open({str(marker)!r}, 'a').write('pth\\n')\n")
    _write(user, "sitecustomize.py", code)  # in the home, which is the kernel's working directory
    _write(user, "ipykernel_launcher.py", code)  # shadowing ipykernel's launcher ...
    _write(user, "paitient/__init__.py", code)  # ... and the package the kernel is started from
    _write(user, "paitient/kernel/start.py", code)
    with UserServer(world.site, user, ("onc",), world.root) as server:
        res = server.run(IN_SANDBOX + "import sys; print('USERSITE', sys.flags.no_user_site, sys.flags.isolated)")
    assert _in_sandbox(res), res
    assert "USERSITE 1 1" in res.stdout
    assert not marker.exists(), marker.read_text()


def test_ld_preload_and_pythonpath_reach_neither_bwrap_nor_the_kernel(world, make_system_user):
    user = make_system_user("preload")
    so, marker = _evil_so(user)
    planted = Path(user.pw_dir) / "planted"
    _write(user, "planted/sitecustomize.py", f"open({str(marker)!r}, 'a').write('pythonpath\\n')\n")
    for rc in (".bashrc", ".profile", ".pam_environment"):
        _write(user, rc, f"export LD_PRELOAD={so}\nexport PYTHONPATH={planted}\n")
    _write(user, ".config/environment.d/50-planted.conf", f"LD_PRELOAD={so}\nPYTHONPATH={planted}\n")
    # The server itself is started with both set (as if the spawner had let them through): the server
    # process loads the library, which proves it works; bwrap and the kernel must not.
    env = {"LD_PRELOAD": str(so), "PYTHONPATH": str(planted)}
    with UserServer(world.site, user, ("onc",), world.root, extra_env=env) as server:
        kid = server.start_kernel("python3", env=env)  # a client asking for them explicitly
        res = server.run(
            IN_SANDBOX + "import os; print('ENV', 'LD_PRELOAD' in os.environ, 'PYTHONPATH' in os.environ)", kid
        )
    assert _in_sandbox(res), res
    assert "ENV False False" in res.stdout
    loaded_by = marker.read_text().splitlines()
    assert any("jupyter_server" in line for line in loaded_by), loaded_by
    for line in loaded_by:
        assert "bwrap" not in line and "prlimit" not in line and KERNEL_MODULE not in line, line
        assert line != "pythonpath"


def test_jupyter_path_variable_does_not_bring_user_specs(world, make_system_user):
    user = make_system_user("path")
    _write(
        user,
        ".planted/kernels/open/kernel.json",
        json.dumps({"argv": ["/bin/true"], "display_name": "open", "language": "python"}),
    )
    env = {"JUPYTER_PATH": str(Path(user.pw_dir) / ".planted")}
    with UserServer(world.site, user, ("onc",), world.root, extra_env=env) as server:
        assert list(server.get("/api/kernelspecs").json()["kernelspecs"]) == ["python3"]
        assert server.request("POST", "/api/kernels", json={"name": "open"}).status_code == 404


def test_a_user_config_path_that_reopens_the_server_stops_it(world, make_system_user):
    # JUPYTER_CONFIG_PATH outranks every other config dir. The spawner never passes it on; should it leak,
    # the paitient extension finds the server open and the server refuses to run instead of running open.
    user = make_system_user("cfgpath")
    _write(user, ".planted/jupyter_server_config.json", json.dumps({"ServerApp": {"terminals_enabled": True}}))
    env = {"JUPYTER_CONFIG_PATH": str(Path(user.pw_dir) / ".planted")}
    server = UserServer(world.site, user, ("onc",), world.root, extra_env=env)
    with pytest.raises(RuntimeError, match="not locked down: terminals are enabled"):
        server.start()
    assert server.proc.returncode == 1
