"""A small seccomp filter for the sandbox, as a classic BPF program handed to ``bwrap --seccomp FD``.

Namespaces and dropped capabilities already stop most of these calls; the filter makes the refusal
explicit (EPERM) and closes what namespaces leave open, such as ptrace of the sandbox's own init
process, reading another process's memory, kernel keyrings and eBPF. System calls of a foreign
architecture (32-bit entry points on a 64-bit host, x32) are refused too.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
_OFF_NR, _OFF_ARCH = 0, 4
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
X32_BIT = 0x40000000

ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# name -> (x86_64 number, aarch64 number)
BLOCKED: dict[str, tuple[int, int]] = {
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "syslog": (103, 116),
    "acct": (163, 89),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "init_module": (175, 105),
    "delete_module": (176, 106),
    "finit_module": (313, 273),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "unshare": (272, 97),
    "setns": (308, 268),
    "perf_event_open": (298, 241),
    "bpf": (321, 280),
    "userfaultfd": (323, 282),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program(machine: str | None = None) -> bytes:
    """The filter for ``machine`` (default: this host), as bytes of ``struct sock_filter``."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise ValueError(f"no seccomp filter for {machine!r}; supported: {', '.join(ARCHES)}")
    col = 0 if machine == "x86_64" else 1
    numbers = sorted({nums[col] for nums in BLOCKED.values()})
    deny = RET_ERRNO | errno.EPERM
    prog = [
        _insn(_LD_W_ABS, 0, 0, _OFF_ARCH),
        _insn(_JEQ_K, 1, 0, ARCHES[machine]),
        _insn(_RET_K, 0, 0, RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if machine == "x86_64":
        # x32 system calls carry bit 30; refuse the whole x32 ABI.
        prog += [_insn(_JGE_K, 0, 1, X32_BIT), _insn(_RET_K, 0, 0, deny)]
    # Each blocked number: jump to the shared "deny" return at the end when equal.
    n = len(numbers)
    for i, nr in enumerate(numbers):
        to_deny = (n - i - 1) + 1  # skip the remaining compares and the "allow" return
        prog.append(_insn(_JEQ_K, to_deny, 0, nr))
    prog += [_insn(_RET_K, 0, 0, RET_ALLOW), _insn(_RET_K, 0, 0, deny)]
    return b"".join(prog)
