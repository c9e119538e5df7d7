"""The seccomp program: structure, and that it really refuses what it lists (in a child process)."""

import errno
import struct
import subprocess
import sys

import pytest

from paitient.rules.seccomp import ARCHES, BLOCKED, RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS, seccomp_program


def decode(prog: bytes):
    return [struct.unpack("HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]


def test_program_checks_arch_then_refuses_each_listed_call():
    insns = decode(seccomp_program("x86_64"))
    assert insns[1][3] == ARCHES["x86_64"] and insns[2][3] == RET_KILL_PROCESS
    compared = {k for code, _, _, k in insns if code == 0x15}
    assert {nums[0] for nums in BLOCKED.values()} <= compared
    assert insns[-2][3] == RET_ALLOW and insns[-1][3] == RET_ERRNO | errno.EPERM


def test_every_jump_lands_on_the_deny_return():
    insns = decode(seccomp_program("aarch64"))
    last = len(insns) - 1
    for i, (code, jt, _jf, k) in enumerate(insns):
        if code == 0x15 and k != ARCHES["aarch64"]:
            assert i + 1 + jt == last


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="no seccomp filter"):
        seccomp_program("riscv64")


def test_loaded_filter_refuses_ptrace_and_allows_the_rest():
    # A child installs the filter with prctl (no_new_privs first) and tries a blocked and an allowed call.
    code = f"""
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
prog = {seccomp_program()!r}
buf = ctypes.create_string_buffer(prog, len(prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fp = Fprog(len(prog) // 8, ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
rc = libc.ptrace(0, 0, 0, 0)
print(rc, ctypes.get_errno(), os.getpid() > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["-1", str(errno.EPERM), "True"], out.stderr
