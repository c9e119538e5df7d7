"""Privilege attacks from inside a sandboxed kernel: no setuid, no ptrace, no namespaces, no mounts."""

import pytest


def _run(alice_kernel, argv):
    res = alice_kernel.run(
        f"_r = subprocess.run({argv!r}, capture_output=True, text=True, stdin=subprocess.DEVNULL)\n"
        "print('@@' + json.dumps({'rc': _r.returncode, 'err': _r.stderr}))"
    )
    import json

    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("@@")][-1][2:])


def test_setuid_su_gains_nothing(alice_kernel):
    out = _run(alice_kernel, ["/usr/bin/su", "root", "-c", "id"])
    assert out["rc"] != 0 and "Critical error" in out["err"], out


def test_setuid_mount_runs_without_root(alice_kernel):
    out = _run(alice_kernel, ["/usr/bin/mount", "-t", "tmpfs", "none", "/tmp"])
    assert out["rc"] == 32 and "must be superuser" in out["err"], out


def test_setuid_passwd_runs_without_root(alice_kernel):
    out = _run(alice_kernel, ["/usr/bin/passwd", "-S", "root"])
    assert out["rc"] == 1 and "You may not view or modify password information for root" in out["err"], out


def test_no_new_privileges_and_no_capabilities(alice_kernel):
    out = alice_kernel.attempt(
        "{k: v.strip() for k, v in (ln.split(':', 1) for ln in open('/proc/self/status')) "
        "if k in ('NoNewPrivs', 'CapEff', 'CapPrm', 'CapBnd', 'CapAmb', 'Seccomp')}"
    )
    assert out["ok"], out
    status = eval(out["value"])  # noqa: S307 - a dict literal the kernel printed
    assert status == {
        "NoNewPrivs": "1",
        "CapEff": "0" * 16,
        "CapPrm": "0" * 16,
        "CapBnd": "0" * 16,
        "CapAmb": "0" * 16,
        "Seccomp": "2",
    }


def test_the_users_server_is_not_even_visible(world, alice_kernel):
    # The pid namespace: the server (outside the sandbox, with network) cannot be named, let alone traced.
    out = alice_kernel.attempt(f"os.kill({world.server_a.proc.pid}, 0)")
    assert out["errno"] == "ESRCH", out


def test_ptrace_is_refused_outright(world, alice_kernel):
    out = alice_kernel.attempt(f"_c(_libc.ptrace(16, {world.server_a.proc.pid}, 0, 0))")  # PTRACE_ATTACH
    assert out["errno"] == "EPERM", out


def test_ptrace_of_the_sandbox_init_is_refused(alice_kernel):
    out = alice_kernel.attempt("_c(_libc.ptrace(16, 1, 0, 0))")
    assert out["errno"] == "EPERM", out


def test_reading_another_process_memory_is_refused(alice_kernel):
    # process_vm_readv(pid 1, ...) with empty vectors: the call itself is refused.
    out = alice_kernel.attempt("_c(_libc.process_vm_readv(1, None, 0, None, 0, 0))")
    assert out["errno"] == "EPERM", out


@pytest.mark.parametrize(
    "flag,name", [(0x10000000, "user"), (0x40000000, "net"), (0x00020000, "mount"), (0x20000000, "pid")]
)
def test_new_namespaces_are_refused(alice_kernel, flag, name):
    out = alice_kernel.attempt(f"_c(_libc.unshare({flag}))")
    assert out["errno"] == "EPERM", (name, out)


def test_unshare_tool_cannot_make_a_user_namespace(alice_kernel):
    out = _run(alice_kernel, ["/usr/bin/unshare", "--user", "--map-root-user", "id"])
    assert out["rc"] != 0 and "Operation not permitted" in out["err"], out


def test_mount_syscall_is_refused(alice_kernel):
    out = alice_kernel.attempt("_c(_libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))")
    assert out["errno"] == "EPERM", out


def test_chroot_is_refused(alice_kernel):
    out = alice_kernel.attempt("_c(_libc.chroot(b'/tmp'))")
    assert out["errno"] == "EPERM", out


def test_becoming_root_is_impossible(alice_kernel):
    # uid 0 does not exist in the sandbox's user namespace.
    out = alice_kernel.attempt("os.setuid(0)")
    assert out["errno"] == "EINVAL", out


def test_kernel_keyrings_and_ebpf_are_refused(alice_kernel):
    out = alice_kernel.attempt("_c(_libc.syscall(250, 0, 0, 0, 0, 0))")  # keyctl (x86_64)
    assert out["errno"] == "EPERM", out
    out = alice_kernel.attempt("_c(_libc.syscall(321, 0, 0, 0))")  # bpf (x86_64)
    assert out["errno"] == "EPERM", out


def test_no_controlling_terminal_to_inject_into(alice_kernel):
    out = alice_kernel.attempt("open('/dev/tty')")
    assert out["errno"] == "ENXIO", out
