"""The bwrap command line, dataset resolution, limits and environment, as plain functions."""

import os
from pathlib import Path

import pytest

from paitient.rules.sandbox import (
    ETC_ALLOWLIST,
    Limits,
    Mount,
    PolicyError,
    SandboxPolicy,
    build_bwrap_argv,
    kernel_env,
    prlimit_argv,
    resolve_datasets,
)
from paitient.server.provisioner import MAX_UNIX_PATH, ipc_prefix


def policy(**kw) -> SandboxPolicy:
    base = dict(
        home="/home/pt-alice",
        runtime_dir="/home/pt-alice/.local/share/jupyter/runtime",
        run_dir="/var/lib/paitient/run",
        data=(Mount("/var/lib/paitient/data/onc/bc/versions/3", "/data/onc/bc"),),
        env=kernel_env("/home/pt-alice", "/var/lib/paitient/run", "/rt"),
    )
    base.update(kw)
    return SandboxPolicy(**base)


def pairs(argv, flag):
    """(source, dest) of every occurrence of a two-argument flag."""
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def test_every_namespace_no_capabilities_new_session_dies_with_parent():
    argv = build_bwrap_argv(policy())
    for flag in (
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert "--share-net" not in argv


def test_environment_is_exactly_the_policy_env():
    argv = build_bwrap_argv(policy())
    env = dict(pairs(argv, "--setenv"))
    assert env == kernel_env("/home/pt-alice", "/var/lib/paitient/run", "/rt")
    assert set(env) == {
        "PATH",
        "HOME",
        "LANG",
        "PAITIENT_RUN_DIR",
        "PAITIENT_DATA_DIR",
        "JUPYTER_RUNTIME_DIR",
        "PYTHONNOUSERSITE",
        "MPLBACKEND",
    }
    assert env["PAITIENT_DATA_DIR"] == "/data"


def test_data_is_read_only_under_data_and_nothing_else_of_the_data_root():
    argv = build_bwrap_argv(policy())
    ro = pairs(argv, "--ro-bind")
    assert ("/var/lib/paitient/data/onc/bc/versions/3", "/data/onc/bc") in ro
    assert not any(src.startswith("/var/lib/paitient/data") and dst != "/data/onc/bc" for src, dst in ro)
    assert not any(src.startswith("/var/lib/paitient/data") for src, _ in pairs(argv, "--bind"))
    i = next(i for i, a in enumerate(argv) if a == "--remount-ro" and argv[i + 1] == "/data")
    assert argv.index("/data/onc/bc") < i


def test_only_allowlisted_etc_files_no_shadow():
    argv = build_bwrap_argv(policy())
    etc = [dst for _, dst in pairs(argv, "--ro-bind") if dst.startswith("/etc")]
    assert "/etc" not in etc
    assert all(p.removeprefix("/etc/") in ETC_ALLOWLIST for p in etc)
    assert not any("shadow" in p or "paitient" in p or "sudoers" in p for p in etc)


def test_home_writable_service_sockets_read_only_root_read_only():
    argv = build_bwrap_argv(policy())
    assert ("/home/pt-alice", "/home/pt-alice") in pairs(argv, "--bind")
    assert ("/var/lib/paitient/run", "/var/lib/paitient/run") in pairs(argv, "--ro-bind")
    # the runtime dir is inside the home: no second bind
    assert len(pairs(argv, "--bind")) == 1
    assert argv[argv.index("--chdir") - 1] == "/" and argv[argv.index("--chdir") - 2] == "--remount-ro"


def test_runtime_dir_outside_home_is_bound_too():
    argv = build_bwrap_argv(policy(runtime_dir="/run/user/20001/jupyter"))
    assert ("/run/user/20001/jupyter", "/run/user/20001/jupyter") in pairs(argv, "--bind")


def test_seccomp_descriptor_is_passed():
    argv = build_bwrap_argv(policy(), seccomp_fd=7)
    assert argv[argv.index("--seccomp") + 1] == "7"
    assert "--seccomp" not in build_bwrap_argv(policy())


@pytest.mark.parametrize(
    "field,value",
    [("home", "relative/home"), ("home", "/"), ("run_dir", "/etc"), ("runtime_dir", "/tmp"), ("home", "")],
)
def test_bad_paths_are_refused(field, value):
    with pytest.raises(PolicyError, match=field):
        build_bwrap_argv(policy(**{field: value}))


def test_a_dataset_mount_outside_data_is_refused():
    with pytest.raises(PolicyError, match="under /data/"):
        build_bwrap_argv(policy(data=(Mount("/srv/x", "/home/pt-alice/x"),)))


def _publish(root: Path, project: str, dataset: str, version: int) -> Path:
    v = root / project / dataset / "versions" / str(version)
    v.mkdir(parents=True)
    (root / project / dataset / "current").symlink_to(f"versions/{version}")
    return v


def test_resolve_datasets_pins_the_current_version(tmp_path):
    v = _publish(tmp_path, "onc", "bc", 4)
    mounts = resolve_datasets(tmp_path, {"onc": ["bc"]})
    assert mounts == [Mount(str(v.resolve()), "/data/onc/bc")]


def test_resolve_datasets_leaves_out_unpublished_and_unlisted(tmp_path):
    _publish(tmp_path, "onc", "bc", 1)
    _publish(tmp_path, "card", "dia", 1)
    assert [m.dest for m in resolve_datasets(tmp_path, {"onc": ["bc", "gbsg"]})] == ["/data/onc/bc"]


def test_resolve_datasets_refuses_current_pointing_elsewhere(tmp_path):
    (tmp_path / "onc" / "bc").mkdir(parents=True)
    (tmp_path / "onc" / "bc" / "current").symlink_to("/etc")
    with pytest.raises(PolicyError, match="not a version folder"):
        resolve_datasets(tmp_path, {"onc": ["bc"]})


@pytest.mark.parametrize("projects", [{"../x": ["bc"]}, {"onc": ["../../etc"]}, {"onc": ["a/b"]}])
def test_resolve_datasets_refuses_bad_names(tmp_path, projects):
    with pytest.raises(PolicyError, match="not a valid name"):
        resolve_datasets(tmp_path, projects)


def test_prlimit_sets_soft_and_hard_equal():
    argv = prlimit_argv(Limits(memory_mb=512, max_processes=50, max_open_files=300, cpu_seconds=0))
    assert argv[1:] == [f"--data={512 << 20}:{512 << 20}", "--nproc=50:50", "--nofile=300:300", "--core=0:0", "--"]
    assert "--cpu=60:60" in prlimit_argv(Limits(cpu_seconds=60))


def test_ipc_prefix_is_short_and_next_to_the_connection_file():
    p = ipc_prefix(
        "/home/a/.local/share/jupyter/runtime/kernel-0123abcd-0000-4000-8000-000000000000.json",
        "0123abcd-0000-4000-8000-000000000000",
    )
    assert p == "/home/a/.local/share/jupyter/runtime/k0123abcd/k"


def test_ipc_prefix_too_long_for_a_unix_socket_says_what_to_do():
    deep = "/" + "d" * (MAX_UNIX_PATH - 5)
    with pytest.raises(PolicyError, match="shorter JUPYTER_RUNTIME_DIR"):
        ipc_prefix(os.path.join(deep, "kernel-x.json"), "0123abcd")


def test_runtime_dir_is_hidden_except_this_kernels_files():
    rt = "/home/pt-alice/.local/share/jupyter/runtime"
    argv = build_bwrap_argv(
        policy(runtime_dir=rt, kernel_dir=f"{rt}/k0123abcd", connection_file=f"{rt}/kernel-0123abcd.json")
    )
    i = next(j for j in range(len(argv)) if argv[j : j + 2] == ["--tmpfs", rt])
    assert argv.index("/home/pt-alice", argv.index("--bind")) < i  # after the home is bound
    assert argv[i : i + 8] == [
        "--tmpfs",
        rt,
        "--bind",
        f"{rt}/k0123abcd",
        f"{rt}/k0123abcd",
        "--ro-bind",
        f"{rt}/kernel-0123abcd.json",
        f"{rt}/kernel-0123abcd.json",
    ]


@pytest.mark.parametrize(
    "kernel_dir,cf",
    [("/home/pt-alice/elsewhere", "/rt/kernel-1.json"), ("/rt/k1", "/etc/passwd"), ("/rt/a/b", "/rt/kernel-1.json")],
)
def test_kernel_files_outside_the_runtime_dir_are_refused(kernel_dir, cf):
    with pytest.raises(PolicyError, match="directly in the runtime dir"):
        build_bwrap_argv(policy(runtime_dir="/rt", kernel_dir=kernel_dir, connection_file=cf))


def test_software_installed_under_tmp_is_bound_after_the_private_tmp():
    # A workspace installed from a checkout under /tmp (as CI does) must stay importable in the sandbox:
    # its bind has to come after the empty /tmp, or the tmpfs hides it.
    argv = build_bwrap_argv(policy(system_ro=("/usr", "/tmp/checkout/extensions/paitient")))
    tmp_at = next(i for i, a in enumerate(argv) if a == "--tmpfs" and argv[i + 1] == "/tmp")
    src_at = argv.index("/tmp/checkout/extensions/paitient")
    assert argv[src_at - 1] == "--ro-bind" and src_at > tmp_at


def test_every_writable_tmpfs_is_sized_and_dev_is_read_only():
    """F3: unsized, /tmp, /dev (and /dev/shm in it) and the runtime dir's mask would each take up to half the
    host's memory, charged to no process. What a real sandbox does with them:
    tests/launcher/test_launcher.py::test_a_kernels_tmp_and_dev_shm_are_sized_and_its_oom_score_cannot_be_lowered."""
    kernel_dir = "/home/pt-alice/.local/share/jupyter/runtime/kabc"
    argv = build_bwrap_argv(
        policy(tmp_bytes=8 << 20, kernel_dir=kernel_dir, connection_file=kernel_dir[:-5] + "/kernel-abc.json")
    )
    sized = {argv[i + 3]: int(argv[i + 1]) for i, a in enumerate(argv) if a == "--size"}
    assert argv[argv.index("--size") + 2] == "--tmpfs"
    assert sized == {"/tmp": 8 << 20, "/dev/shm": 8 << 20, "/home/pt-alice/.local/share/jupyter/runtime": 1 << 20}
    tmpfs = {argv[i + 1] for i, a in enumerate(argv) if a == "--tmpfs"}
    assert tmpfs - set(sized) == {"/data"}  # and /data is made read-only
    ro = [argv[i + 1] for i, a in enumerate(argv) if a == "--remount-ro"]
    assert ro == ["/dev", "/data", "/"]
    assert argv.index("--dev") < argv.index("/dev/shm") < argv.index("--remount-ro")  # its nodes first
    for bad in (0, 4096, -1):
        with pytest.raises(PolicyError, match="tmp_bytes"):
            build_bwrap_argv(policy(tmp_bytes=bad))
