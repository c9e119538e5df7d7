"""The container engine of the docker spawner: podman's Docker-compatible API, with storage of its own.

``paitient up`` (spawner ``paitient-docker``) starts it before the hub and stops it, by its pid, after the
researchers' containers and the hub have stopped. Everything it keeps lies under ``<state_dir>/engine``
(root, 0700): image and container storage, its run state, its temporary files, its ``containers.conf`` and
the API's socket. Nothing is read from or written to the host's own podman or Docker configuration, and no
registry is ever asked: the one image, :func:`image_tag`, is made here from a tar of a few folders and
symbolic links (:func:`base_layer`); the host's ``/usr``, the workspace's Python environment and the rest
of what a server needs are bound into each container read-only at run time (:mod:`paitient.hub.container`).

Installed under systemd (``paitient install``), ``paitient-engine.service`` runs the same API service, with
this module's steps around it: ``python -m paitient.hub.engine prepare`` before (folders, configuration),
``ready`` after it starts (the API answers; the image is made when missing) and ``release`` after it stops
(mounts its storage left).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import paitient
from paitient.fsutil import atomic_write_text

IMAGE_REPOSITORY = "localhost/paitient-singleuser"

CONTAINERS_CONF = """\
# Written by paitient (hub/engine.py) for the engine `paitient up` starts; read through CONTAINERS_CONF.
[containers]
# root here lacks CAP_SYS_RESOURCE to raise limits above the engine's own
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
# crun refuses this machine's hybrid cgroup layout; runc does not
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{dir}/events.log"

[network]
network_config_dir = "{dir}/networks"
"""


class EngineError(RuntimeError):
    """The engine cannot be started or used; the message says why and what to do."""


def image_tag() -> str:
    """The single-user image, tagged with the package's version."""
    return f"{IMAGE_REPOSITORY}:{paitient.__version__}"


def base_layer() -> bytes:
    """The image's only layer: empty folders for the mount points and the merged-/usr links (``/bin`` ->
    ``usr/bin``, ...). No file, no program: everything the server runs comes from read-only binds."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in (
            ("dev", 0o755),
            ("etc", 0o755),
            ("home", 0o755),
            ("opt", 0o755),
            ("proc", 0o555),
            ("run", 0o755),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("usr", 0o755),
            ("var", 0o755),
            ("var/tmp", 0o1777),
        ):
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = tarfile.DIRTYPE, mode
            tar.addfile(entry)
        for name in ("bin", "sbin", "lib", "lib64"):
            entry = tarfile.TarInfo(name)
            entry.type, entry.linkname = tarfile.SYMTYPE, f"usr/{name}"
            tar.addfile(entry)
    return out.getvalue()


@dataclass(frozen=True)
class Engine:
    """podman's Docker API for one workspace: paths, command, image."""

    state_dir: Path
    podman: str = "podman"

    @property
    def dir(self) -> Path:
        return self.state_dir / "engine"

    @property
    def conf(self) -> Path:
        return self.dir / "containers.conf"

    @property
    def socket(self) -> Path:
        return self.dir / "podman.sock"

    @property
    def url(self) -> str:
        """What docker-py and DockerSpawner are given (``client_kwargs`` ``base_url``)."""
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        return {"CONTAINERS_CONF": str(self.conf)}

    def command(self, *args: str) -> list[str]:
        """``podman`` on this engine's storage."""
        return [
            self.podman,
            "--root",
            str(self.dir / "storage"),
            "--runroot",
            str(self.dir / "run"),
            "--tmpdir",
            str(self.dir / "tmp"),
            *args,
        ]

    def service_command(self) -> list[str]:
        """The API service, serving until it is stopped (``--time=0``: no idle exit)."""
        return self.command("system", "service", "--time=0", self.url)

    def prepare(self) -> None:
        """The engine's folders (root 0700) and its containers.conf; a stale socket is removed."""
        if shutil.which(self.podman) is None:
            raise EngineError(
                f"{self.podman} is not installed (the docker spawner runs servers through podman's Docker API); "
                "run: bash scripts/setup install"
            )
        for d in (self.dir, self.dir / "storage", self.dir / "run", self.dir / "tmp", self.dir / "networks"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        atomic_write_text(self.conf, CONTAINERS_CONF.format(dir=self.dir), mode=0o644)
        try:
            self.socket.unlink()
        except FileNotFoundError:
            pass

    def _run(self, *args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args),
            input=stdin,
            capture_output=True,
            env={**os.environ, **self.env},
            timeout=timeout,
            check=False,
        )

    def has_image(self, tag: str) -> bool:
        return self._run("image", "exists", tag).returncode == 0

    def ensure_image(self, tag: str | None = None) -> bool:
        """Make the single-user image unless the engine holds it; True when it was made now."""
        tag = tag or image_tag()
        if self.has_image(tag):
            return False
        r = self._run(
            "import",
            "--change",
            'CMD ["/bin/false"]',
            "--change",
            "USER 65534:65534",
            "--change",
            f"LABEL org.opencontainers.image.version={paitient.__version__}",
            "--change",
            "LABEL org.opencontainers.image.title=paitient-singleuser",
            "-",
            tag,
            stdin=base_layer(),
        )
        if r.returncode != 0:
            raise EngineError(f"podman could not make the image {tag}: {r.stderr.decode(errors='replace')[-800:]}")
        return True

    def ping(self, timeout: float = 2.0) -> bool:
        """True when the API answers ``/_ping``."""
        conn = _UnixHTTPConnection(str(self.socket), timeout)
        try:
            conn.request("GET", "/_ping")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def wait_answer(self, timeout: float) -> None:
        """Until the API answers (an engine started by someone else: systemd); :class:`EngineError` if it does
        not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() >= deadline:
                raise EngineError(f"the container engine did not answer on {self.socket} within {timeout:.0f}s")
            time.sleep(0.1)

    def wait_ready(self, proc: subprocess.Popen, timeout: float, log: Path) -> None:
        """Until the API answers; an engine that exits or stays silent is an :class:`EngineError` with the
        tail of its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EngineError(f"the container engine exited with code {proc.returncode}: {_tail(log)}")
            if self.ping():
                return
            time.sleep(0.1)
        raise EngineError(f"the container engine did not answer on {self.socket} within {timeout:.0f}s: {_tail(log)}")

    def mounts(self) -> list[str]:
        """Mount points under the engine's folder (its storage keeps one after the service ends)."""
        root = str(self.dir) + "/"
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = _unescape(line.split()[4])
                if (point + "/").startswith(root):
                    found.append(point)
        return found

    def release_mounts(self) -> list[str]:
        """Unmount what the engine left mounted, deepest first; the engine must have ended. Returns what
        could not be unmounted."""
        left = []
        for point in sorted(self.mounts(), key=len, reverse=True):
            r = subprocess.run(["umount", point], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                left.append(f"{point} ({r.stderr.strip()})")
        return left


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline and backslash as octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return f"(no log at {log})"
    return " | ".join(text) or f"(nothing in {log})"


def main(argv: list[str] | None = None) -> int:
    """The steps of the engine's systemd unit around its API service: ``prepare``, ``ready``, ``release``."""
    ap = argparse.ArgumentParser(prog="python -m paitient.hub.engine", description=main.__doc__)
    ap.add_argument("step", choices=("prepare", "ready", "release"))
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--podman", default="podman")
    ap.add_argument("--timeout", type=float, default=60.0, help="ready: seconds to wait for the API")
    args = ap.parse_args(argv)
    engine = Engine(args.state_dir, podman=args.podman)
    try:
        if args.step == "prepare":
            engine.prepare()
        elif args.step == "ready":
            engine.wait_answer(args.timeout)
            if engine.ensure_image():
                print(f"paitient engine: made the image {image_tag()}", flush=True)
        else:
            left = engine.release_mounts()
            if left:
                print(f"paitient engine: mounts left: {', '.join(left)}", file=sys.stderr)
                return 1
    except EngineError as e:
        print(f"paitient engine: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
