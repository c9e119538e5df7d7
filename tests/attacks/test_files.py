"""File attacks from inside a sandboxed kernel: data read-only, everything else of the host invisible.

Several targets are world-readable on the host on purpose (the other project's data, the site file, the
registry): what stops the read is that the sandbox does not contain them.
"""

import os

import pytest


def test_own_dataset_is_readable(alice_kernel):
    out = alice_kernel.attempt("open('/data/onc/bc/data.csv').read()")
    assert out["ok"] and "id,size" in out["value"], out


def test_writing_a_dataset_file_fails_read_only(world, alice_kernel):
    # The file belongs to Alice on the host (see conftest): the mount, not the mode, refuses.
    assert (world.site.data_root / "onc" / "bc" / "current" / "data.csv").stat().st_uid == world.alice.pw_uid
    out = alice_kernel.attempt("open('/data/onc/bc/data.csv', 'a').write('forged')")
    assert out["errno"] == "EROFS", out


def test_creating_a_file_under_data_fails_read_only(alice_kernel):
    out = alice_kernel.attempt("open('/data/onc/bc/new.csv', 'w')")
    assert out["errno"] == "EROFS", out


def test_creating_a_project_folder_under_data_fails_read_only(alice_kernel):
    out = alice_kernel.attempt("os.mkdir('/data/card')")
    assert out["errno"] == "EROFS", out


def test_another_projects_data_is_not_mounted(world, alice_kernel):
    assert (world.site.data_root / "card" / "dia" / "current" / "data.csv").stat().st_mode & 0o004
    out = alice_kernel.attempt("os.listdir('/data')")
    assert out["ok"] and out["value"] == "['onc']", out
    out = alice_kernel.attempt("open('/data/card/dia/data.csv').read()")
    assert out["errno"] == "ENOENT", out


def test_another_projects_data_by_host_path_is_not_visible(world, alice_kernel):
    host = world.site.data_root / "card" / "dia" / "versions" / "1" / "data.csv"
    out = alice_kernel.attempt(f"open({str(host)!r}).read()")
    assert out["errno"] == "ENOENT", out


def test_another_users_home_is_not_visible(world, alice_kernel):
    out = alice_kernel.attempt(f"open('{world.bob.pw_dir}/bob-private.txt').read()")
    assert out["errno"] == "ENOENT", out
    out = alice_kernel.attempt(f"os.listdir('{world.root}/h')")
    assert out["ok"] and out["value"] == f"['{world.alice.pw_name}']", out


@pytest.mark.parametrize("secret", ["hub_db", "cookie_secret", "site_config", "key", "registry"])
def test_hub_and_service_state_is_not_visible(world, alice_kernel, secret):
    out = alice_kernel.attempt(f"open({str(world.secrets[secret])!r}, 'rb').read()")
    assert out["errno"] == "ENOENT", out


def test_etc_shadow_is_not_visible(alice_kernel):
    out = alice_kernel.attempt("open('/etc/shadow').read()")
    assert out["errno"] == "ENOENT", out


def test_proc_of_the_users_server_is_not_visible(world, alice_kernel):
    pid = world.server_a.proc.pid
    out = alice_kernel.attempt(f"open('/proc/{pid}/environ', 'rb').read()")
    assert out["errno"] == "ENOENT", out


def test_proc_shows_only_the_sandbox(alice_kernel):
    out = alice_kernel.attempt("sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[:2]")
    assert out["ok"] and out["value"] == "[1, 2]", out


def test_system_is_read_only(alice_kernel):
    out = alice_kernel.attempt("open('/usr/lib/paitient-planted', 'w')")
    assert out["errno"] == "EROFS", out


def test_python_environment_is_read_only(alice_kernel):
    import sys

    out = alice_kernel.attempt(f"open('{sys.prefix}/lib/python3.11/site-packages/zz_planted.pth', 'w')")
    assert out["errno"] == "EROFS", out


def test_home_is_writable_and_persists_on_the_host(world, alice_kernel):
    from pathlib import Path

    out = alice_kernel.attempt(f"open('{world.alice.pw_dir}/result.txt', 'w').write('ok')")
    assert out["ok"], out
    assert (Path(world.alice.pw_dir) / "result.txt").read_text() == "ok"


def test_environment_holds_no_credentials(alice_kernel):
    # The environment the kernel was started with (ipykernel adds display settings later).
    out = alice_kernel.attempt(
        "sorted(v.split(b'=')[0].decode() for v in open('/proc/self/environ','rb').read().split(b'\\0') if v)"
    )
    assert out["ok"], out
    names = eval(out["value"])  # noqa: S307 - a list literal the kernel printed
    assert names == sorted(
        [
            "HOME",
            "JUPYTER_RUNTIME_DIR",
            "LANG",
            "MPLBACKEND",
            "PAITIENT_DATA_DIR",
            "PAITIENT_RUN_DIR",
            "PATH",
            "PWD",
            "PYTHONNOUSERSITE",
        ]
    )
    out = alice_kernel.attempt("[k for k in os.environ if 'TOKEN' in k or k.startswith(('JUPYTERHUB', 'JPY_'))]")
    assert out["ok"] and out["value"] == "[]", out


def test_hub_token_of_the_server_is_not_readable_from_proc(alice_kernel):
    out = alice_kernel.attempt("[open(f'/proc/{p}/environ','rb').read() for p in os.listdir('/proc') if p.isdigit()]")
    assert out["ok"] and "hub-token-secret" not in out["value"], out


def test_runtime_dir_shows_only_this_kernels_files(world, alice_kernel):
    # The server keeps its cookie secret and every kernel's connection key there.
    runtime = f"{world.alice.pw_dir}/.local/share/jupyter/runtime"
    other = world.server_a.start_kernel()  # a second kernel of the same user, with its own key
    host = sorted(os.listdir(runtime))
    assert "jupyter_cookie_secret" in host and f"kernel-{other}.json" in host
    out = alice_kernel.attempt(f"sorted(os.listdir({runtime!r}))")
    assert out["ok"], out
    seen = eval(out["value"])  # noqa: S307 - a list literal the kernel printed
    assert seen == sorted([f"k{alice_kernel.kernel_id.replace('-', '')[:8]}", f"kernel-{alice_kernel.kernel_id}.json"])
    out = alice_kernel.attempt(f"open('{runtime}/jupyter_cookie_secret', 'rb').read()")
    assert out["errno"] == "ENOENT", out
    out = alice_kernel.attempt(f"open('{runtime}/kernel-{other}.json').read()")
    assert out["errno"] == "ENOENT", out
    assert world.server_a.request("DELETE", f"/api/kernels/{other}").status_code == 204
