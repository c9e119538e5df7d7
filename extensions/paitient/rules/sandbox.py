"""What a sandboxed kernel sees, as plain data, and the bubblewrap command line that enforces it.

Nothing here starts a process or reads the site configuration: :func:`resolve_datasets` turns the data
root and the user's projects into mounts, :func:`build_bwrap_argv` turns a :class:`SandboxPolicy` into
the argument list of ``bwrap``, :func:`prlimit_argv` the resource limits into a ``prlimit`` prefix.
The provisioner (:mod:`paitient.server.provisioner`) is the thin stateful wrapper around them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import paitient
from paitient.config import NAME_RE

# Only these files and folders of the host's /etc are visible in a sandbox: enough for the C library,
# Python, TLS certificates and fonts. Not shadow, not gshadow, not any site or service configuration.
ETC_ALLOWLIST: tuple[str, ...] = (
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl/certs",
    "ca-certificates",
    "fonts",
    "mime.types",
    "alternatives",
    "os-release",
    "protocols",
    "services",
    "locale.alias",
)

# Top-level symlinks of a merged-/usr system, recreated as symlinks inside the sandbox.
USR_MERGE_LINKS: tuple[str, ...] = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

TMP_BYTES = 1 << 30
"""Default size of a sandbox's /tmp and of its /dev/shm, each (``[sandbox] tmp_bytes``)."""
RUNTIME_TMPFS_BYTES = 1 << 20
"""Size of the empty tmpfs that hides the runtime dir (it only holds the mount points of one kernel)."""


def user_runtime_dir(home: str) -> str:
    """The Jupyter runtime dir of a user's server (connection files, kernels' sockets), as the spawner sets it."""
    return os.path.join(home, ".local", "share", "jupyter", "runtime")


OOM_SCORE_ADJ = 1000
"""The oom_score_adj of every sandbox (kernels, the training runner's workers, the airlock's audits): the OOM
killer's first choice, before any service whatever its size."""


def oom_first() -> list[str]:
    """The ``choom`` prefix that, run as root, gives what follows :data:`OOM_SCORE_ADJ` and, written with
    CAP_SYS_RESOURCE, that as the floor: the process and its children cannot lower it."""
    return ["choom", "-n", str(OOM_SCORE_ADJ), "--"]


def drop_to(uid: int, gid: int) -> list[str]:
    """The prefix that runs a root-side worker as ``uid``/``gid``: ``choom`` as root sets its oom_score_adj
    to :data:`OOM_SCORE_ADJ` and, written with CAP_SYS_RESOURCE, the floor the sandbox cannot lower it below;
    then ``setpriv``: no groups, no new privileges, and SIGKILL when the process that started it dies (kept
    through the exec of prlimit and bwrap)."""
    return [
        *oom_first(),
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--no-new-privs",
        "--pdeathsig=KILL",
    ]


def python_roots() -> list[str]:
    """Host folders a sandboxed Python needs: the environment, the interpreter it was made from when that lies
    outside /usr (a venv of a Python that uv or pyenv installed), and paitient's source if installed editable."""
    roots = [sys.prefix]
    base = os.path.realpath(sys.base_prefix)
    if base != os.path.realpath(sys.prefix) and not (base + "/").startswith("/usr/"):
        roots.append(base)
    pkg = str(Path(paitient.__file__).resolve().parent)
    if not pkg.startswith(sys.prefix.rstrip("/") + "/"):
        roots.append(pkg)
    return roots


class PolicyError(ValueError):
    """A sandbox policy cannot be built; the message says what to fix."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one kernel (rlimits; 0 means no limit for ``cpu_seconds``)."""

    memory_mb: int = 4096
    max_processes: int = 256
    max_open_files: int = 1024
    cpu_seconds: int = 0
    max_file_bytes: int = 0
    """RLIMIT_FSIZE: the largest file a process may write (0: no limit). Past it a write fails (or SIGXFSZ)."""


@dataclass(frozen=True)
class Mount:
    """``source`` on the host appears at ``dest`` in the sandbox."""

    source: str
    dest: str
    writable: bool = False


@dataclass(frozen=True)
class SandboxPolicy:
    home: str
    """The user's home: bound read-write at the same path, and the kernel's HOME."""
    runtime_dir: str
    """Jupyter runtime dir of the user's server. With ``kernel_dir`` set it is hidden (an empty tmpfs)
    except for this kernel's socket folder and connection file; without, it is bound read-write."""
    run_dir: str
    """Service sockets (``<state_dir>/run``): bound read-only at the same path; sockets stay connectable."""
    data: tuple[Mount, ...] = ()
    """Dataset versions, read-only under /data/<project>/<dataset>."""
    system_ro: tuple[str, ...] = ("/usr",)
    """Host folders bound read-only at the same path (the system, the Python environment, paitient)."""
    etc: tuple[str, ...] = ETC_ALLOWLIST
    usr_links: tuple[str, ...] = USR_MERGE_LINKS
    extra_ro: tuple[str, ...] = ()
    """Further read-only paths at the same path (e.g. ``/sys/devices/system/cpu`` for thread counts)."""
    kernel_dir: str = ""
    """This kernel's ipc socket folder inside ``runtime_dir`` (bound read-write)."""
    connection_file: str = ""
    """This kernel's connection file inside ``runtime_dir`` (bound read-only)."""
    env: dict[str, str] = field(default_factory=dict)
    """The kernel's whole environment (everything else is cleared)."""
    cwd: str = ""
    """Working directory inside the sandbox; empty: the home."""
    hostname: str = "sandbox"
    devices: tuple[str, ...] = ()
    """Host device nodes bound into the private /dev at the same path (a GPU's, for the training runner's
    worker; none for kernels)."""
    home_tmpfs: bool = False
    """The home is an empty tmpfs of ``tmp_bytes`` at ``home`` instead of the host folder: nothing the sandbox
    writes reaches the host's disk (the airlock's audit, whose model code would otherwise fill it)."""
    home_mounts: tuple[Mount, ...] = ()
    """Host paths bound at their ``dest`` once the home is in place (a tmpfs home's inputs and output)."""
    tmp_bytes: int = TMP_BYTES
    """Size of the private /tmp and of /dev/shm, each, in bytes. tmpfs pages are charged to no process:
    unsized, each would take up to half the host's memory, out of the rlimits' and the OOM killer's sight."""


def resolve_datasets(data_root: str | os.PathLike[str], projects: dict[str, list[str]]) -> list[Mount]:
    """Mounts for each published dataset of ``projects`` (project name -> dataset names).

    ``<data_root>/<project>/<dataset>/current`` is resolved now, so the kernel sees one fixed version
    for its whole life. A dataset not yet published (no ``current``) is left out. A ``current`` that
    points outside its dataset's ``versions`` folder is refused.
    """
    root = Path(data_root)
    mounts: list[Mount] = []
    for project in sorted(projects):
        if not NAME_RE.match(project):
            raise PolicyError(f"project name {project!r} is not a valid name; fix the site configuration")
        for dataset in sorted(set(projects[project])):
            if not NAME_RE.match(dataset):
                raise PolicyError(f"dataset name {dataset!r} of project {project!r} is not a valid name")
            current = root / project / dataset / "current"
            if not current.exists():
                continue
            target = current.resolve(strict=True)
            versions = (root / project / dataset / "versions").resolve()
            if target.parent != versions or not target.is_dir():
                raise PolicyError(
                    f"{current} points to {target}, which is not a version folder under {versions}; "
                    "republish the dataset with the ingest command"
                )
            mounts.append(Mount(str(target), f"/data/{project}/{dataset}"))
    return mounts


KERNEL_MODULE = "paitient.kernel.start"
"""The kernel, run as ``python -I -m KERNEL_MODULE -f CONNECTION_FILE``: ipykernel without its debugger
(:mod:`paitient.kernel.start`). Its name is in every kernel's command line."""


def kernel_argv(python: str) -> list[str]:
    """The kernel's command, ``{connection_file}`` to be filled in."""
    return [python, "-I", "-m", KERNEL_MODULE, "-f", "{connection_file}"]


def kernel_env(policy_home: str, run_dir: str, runtime_dir: str, lang: str = "C.UTF-8") -> dict[str, str]:
    """The complete environment of a sandboxed kernel: no tokens, no parent pid, nothing inherited."""
    return {
        "PATH": SANDBOX_PATH,
        "HOME": policy_home,
        "LANG": lang,
        "PAITIENT_RUN_DIR": run_dir,
        "PAITIENT_DATA_DIR": "/data",
        "JUPYTER_RUNTIME_DIR": runtime_dir,
        "PYTHONNOUSERSITE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }


def _check_abs(what: str, path: str) -> None:
    if not path or not os.path.isabs(path):
        raise PolicyError(f"{what} must be an absolute path, got {path!r}")
    if os.path.normpath(path) in ("/", "/etc", "/proc", "/dev", "/tmp", "/data"):  # noqa: S108 (sandbox paths)
        raise PolicyError(f"{what} may not be {path!r}: it would hide or expose a system folder")


def build_bwrap_argv(
    policy: SandboxPolicy, bwrap: str = "/usr/bin/bwrap", seccomp_fd: int | None = None, info_fd: int | None = None
) -> list[str]:
    """The ``bwrap`` command line (without the kernel command) that enforces ``policy``.

    Namespaces: every one bwrap knows (network, pid, ipc, uts, cgroup, user), nested user namespaces
    disabled; no capabilities; a new session (no TIOCSTI into the server's terminal); dies with its
    parent; with ``seccomp_fd``, the filter of :mod:`paitient.rules.seccomp` read from that descriptor; with
    ``info_fd``, bubblewrap writes there the host pid of the sandbox's init (``child-pid``), which its caller
    kills to end the whole sandbox (:class:`paitient.services.kit.sandboxed.SandboxInit`).
    Filesystem: read-only system, a minimal /etc, private /proc, /dev and /tmp, the home
    read-write (or a tmpfs, ``home_tmpfs``), the datasets read-only, the service sockets and the runtime dir
    at their host paths. Every writable tmpfs is sized (/tmp, /dev/shm and a tmpfs home: ``policy.tmp_bytes``
    each; the runtime dir's mask:
    :data:`RUNTIME_TMPFS_BYTES`) and /dev itself is read-only, so no write in the sandbox fills memory
    past those bounds.
    """
    if policy.tmp_bytes < 1 << 20:
        raise PolicyError(f"tmp_bytes must be at least 1 MiB, got {policy.tmp_bytes!r}")
    _check_abs("home", policy.home)
    _check_abs("runtime_dir", policy.runtime_dir)
    _check_abs("run_dir", policy.run_dir)
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        policy.hostname,
        "--clearenv",
    ]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    for key, value in sorted(policy.env.items()):
        argv += ["--setenv", key, value]
    # The private /proc, /dev and /tmp first: what is bound below may lie under /tmp (a workspace
    # installed from a checkout there) and must not be covered by the empty /tmp.
    # bwrap's /dev is a tmpfs of the default size (half the host's memory), its /dev/shm a folder in it:
    # /dev/shm gets a sized tmpfs of its own, and /dev is made read-only once its nodes are in place.
    size = str(policy.tmp_bytes)
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm"]  # noqa: S108
    argv += ["--size", size, "--tmpfs", "/tmp", "--tmpfs", "/data"]  # noqa: S108
    for node in policy.devices:
        if not node.startswith("/dev/") or os.path.normpath(node) != node or node.startswith("/dev/shm/"):  # noqa: S108
            raise PolicyError(f"device {node!r} must be a node under /dev/")
        argv += ["--dev-bind", node, node]
    argv += ["--remount-ro", "/dev"]
    for path in policy.system_ro:
        _check_abs("system_ro entry", path)
        argv += ["--ro-bind", path, path]
    for name in policy.usr_links:
        host = Path("/") / name
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), str(host)]
    argv += ["--dir", "/etc"]
    for name in policy.etc:
        host = Path("/etc") / name
        if host.exists():
            argv += ["--ro-bind", str(host), str(host)]
    for path in policy.extra_ro:
        argv += ["--ro-bind-try", path, path]
    for m in policy.data:
        if not m.dest.startswith("/data/"):
            raise PolicyError(f"dataset mount {m.dest!r} must lie under /data/")
        argv += ["--bind" if m.writable else "--ro-bind", m.source, m.dest]
    argv += ["--remount-ro", "/data"]
    if policy.home_tmpfs:
        argv += ["--size", size, "--tmpfs", policy.home]
    else:
        argv += ["--bind", policy.home, policy.home]
    for m in policy.home_mounts:
        _check_abs("home_mounts entry", m.dest)
        argv += ["--bind" if m.writable else "--ro-bind", m.source, m.dest]
    if policy.kernel_dir:
        # Other kernels' keys and the server's cookie secret live in the runtime dir: hide it, then
        # bring back only what this kernel needs.
        for what, path in (("kernel_dir", policy.kernel_dir), ("connection_file", policy.connection_file)):
            if os.path.dirname(os.path.normpath(path)) != os.path.normpath(policy.runtime_dir):
                raise PolicyError(f"{what} {path!r} must lie directly in the runtime dir {policy.runtime_dir!r}")
        argv += [
            "--size",
            str(RUNTIME_TMPFS_BYTES),
            "--tmpfs",
            policy.runtime_dir,
            "--bind",
            policy.kernel_dir,
            policy.kernel_dir,
            "--ro-bind",
            policy.connection_file,
            policy.connection_file,
        ]
    elif not (policy.runtime_dir + "/").startswith(policy.home.rstrip("/") + "/"):
        argv += ["--bind", policy.runtime_dir, policy.runtime_dir]
    argv += ["--ro-bind", policy.run_dir, policy.run_dir]
    argv += ["--remount-ro", "/", "--chdir", policy.cwd or policy.home]
    return argv


def prlimit_argv(limits: Limits, prlimit: str = "/usr/bin/prlimit") -> list[str]:
    """A ``prlimit`` prefix setting soft = hard limits, so the kernel cannot raise them again.

    Memory is RLIMIT_DATA (private writable memory: heap and anonymous mappings), which follows what a
    kernel really uses better than address space (thread stacks and library mappings inflate that).
    """
    mem = limits.memory_mb * 1024 * 1024
    argv = [
        prlimit,
        f"--data={mem}:{mem}",
        f"--nproc={limits.max_processes}:{limits.max_processes}",
        f"--nofile={limits.max_open_files}:{limits.max_open_files}",
        "--core=0:0",
    ]
    if limits.cpu_seconds:
        argv.append(f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds}")
    if limits.max_file_bytes:
        argv.append(f"--fsize={limits.max_file_bytes}:{limits.max_file_bytes}")
    return [*argv, "--"]
