"""The Kubernetes profile's images, built with podman from ``kernels/image/Containerfile``, asking no container
registry.

A data integration centre's build host often reaches a Debian mirror and a Python package index but no public
container registry. ``python -m paitient.ops.images`` builds there:

1. the Debian 12 base, unless ``--base`` names one: ``mmdebstrap`` makes a minimal root file system from the
   host's own apt sources (:func:`host_sources`, which the image keeps, so the builds' ``apt-get`` asks the
   same mirror), with the packages the ``singleuser`` stage installs, and ``podman import`` makes it the
   image ``localhost/paitient-debian:12``;
2. ``singleuser`` and ``services`` from the Containerfile on that base (``--build-arg BASE``), in the repository
   root as the build context. The build's steps reach the network through the host's (Debian's packages, the
   package index). ``--wheels DIR`` lets pip take wheels from a folder first (a CPU build of torch, where
   the index would give an accelerator build of several GB); ``--cert FILE`` is the CA bundle pip checks the
   index's certificate with (a proxy that inspects TLS). Both are bound into the build's steps only, under
   ``/tmp``, and are not in the images.

``--podman-root DIR`` keeps the images in a storage of their own (the engine's layout,
:class:`paitient.hub.engine.Engine`); without it podman's own storage, from which ``podman push`` takes them to
the site's registry. ``bash scripts/setup test`` builds them into :func:`suite_storage`, where
``tests/kubernetes/test_images.py`` runs them (a test itself asks no network).

Each image is labelled with :func:`source_digest` of the tree it was built from, so an image older than the
code is recognised (:func:`built_from`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import paitient
from paitient.hub.engine import Engine

CONTAINERFILE = Path("kernels") / "image" / "Containerfile"
BASE_TAG = "localhost/paitient-debian:12"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "bubblewrap", "util-linux", "ca-certificates", "tini")
"""What the Containerfile's ``singleuser`` stage installs with apt; the base holds them already."""
TARGETS = ("singleuser", "services")
BUILD_WHEELS = "/tmp/build-wheels"  # noqa: S108 - a mount point inside the build's container
BUILD_CERTS = "/tmp/build-certs"  # noqa: S108


SOURCE_LABEL = "org.paitient.source"
SOURCES = ("pyproject.toml", "README.md", "extensions", "kernels")
"""What the Containerfile copies into the images (and the Containerfile itself, under ``kernels``)."""


class ImageError(RuntimeError):
    """An image could not be built; the message says which step and why."""


def image_tag(target: str) -> str:
    """``localhost/paitient-<target>:<version>``: the tag a build gives each target."""
    return f"localhost/paitient-{target}:{paitient.__version__}"


def suite_storage() -> Path:
    """Where ``scripts/setup test`` builds the images: ``<prefix>/images`` beside the environment."""
    return Path(sys.prefix).parent / "images"


def source_digest(context: Path) -> str:
    """SHA-256 over the names and contents of :data:`SOURCES` under ``context``, leaving out what tools
    write beside the sources (hidden folders such as mypy's cache, ``__pycache__``, ``*.egg-info``)."""
    h = hashlib.sha256()
    for top in SOURCES:
        root = context / top
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            parts = path.relative_to(context).parts
            if any(p.startswith(".") or p == "__pycache__" or p.endswith(".egg-info") for p in parts):
                continue
            h.update("/".join(parts).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class Builder:
    """podman, on a storage of its own (``engine``) or on its default one (``None``)."""

    engine: Engine | None = None

    def command(self, *args: str) -> list[str]:
        return self.engine.command(*args) if self.engine else ["podman", *args]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **(self.engine.env if self.engine else {})}

    def run(self, *args: str, timeout: float, stdin: int | None = None, log: Path | None = None) -> None:
        """``podman args``, its output appended to ``log``; :class:`ImageError` with the output's tail when it
        fails."""
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(log, "ab")) if log else subprocess.PIPE
            try:
                r = subprocess.run(
                    self.command(*args), stdin=stdin, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                    timeout=timeout, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise ImageError(f"podman {args[0]} did not finish within {timeout:.0f}s") from None
        if r.returncode != 0:
            tail = log.read_bytes()[-1500:] if log else (r.stdout or b"")[-1500:]
            raise ImageError(f"podman {args[0]} failed (exit {r.returncode}): {tail.decode(errors='replace')}")

    def has(self, tag: str) -> bool:
        r = subprocess.run(self.command("image", "exists", tag), env=self.env, capture_output=True, check=False)
        return r.returncode == 0

    def label(self, tag: str, name: str) -> str | None:
        """The image's label ``name``; None when the image or the label is missing."""
        r = subprocess.run(self.command("image", "inspect", tag), env=self.env, capture_output=True, check=False)
        if r.returncode != 0:
            return None
        labels = json.loads(r.stdout)[0].get("Config", {}).get("Labels") or {}
        value = labels.get(name)
        return str(value) if value is not None else None

    def built_from(self, target: str, context: Path) -> bool:
        """True when ``target``'s image exists and was built from the tree at ``context`` as it is now."""
        return self.label(image_tag(target), SOURCE_LABEL) == source_digest(context)

    def make_base(self, tag: str = BASE_TAG, log: Path | None = None, sources: list[Path] | None = None) -> None:
        """Debian 12 with :data:`BASE_PACKAGES`, imported as ``tag``, from ``sources`` (default: the host's
        apt sources for :data:`SUITE`, :func:`host_sources`), which the image keeps as its own."""
        if shutil.which("mmdebstrap") is None:
            raise ImageError("mmdebstrap is not installed (it makes the Debian base); run: apt-get install mmdebstrap")
        sources = host_sources() if sources is None else sources
        if not sources:
            raise ImageError(
                f"no apt source of this host names {SUITE} (/etc/apt/sources.list, /etc/apt/sources.list.d/): "
                "the base is made from the mirror the host uses; add one, or build on an image with --base"
            )
        argv = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, "-"]
        with contextlib.ExitStack() as files:
            err = files.enter_context(open(log, "ab")) if log else subprocess.DEVNULL
            tar = subprocess.Popen([*argv, *map(str, sources)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=err)  # fmt: skip
        assert tar.stdout is not None
        try:
            self.run("import", "--change", 'CMD ["/bin/bash"]', "-", tag, stdin=tar.stdout.fileno(), timeout=900,
                     log=log)  # fmt: skip
        finally:
            tar.stdout.close()  # mmdebstrap, if it still writes, ends on the closed pipe
            code = tar.wait(timeout=900)
        if code != 0:
            with contextlib.suppress(ImageError):
                self.run("rmi", "--ignore", tag, timeout=60)
            raise ImageError(f"mmdebstrap failed (exit {code}); its output is in {log or 'its standard error'}")

    def build(
        self,
        target: str,
        *,
        context: Path,
        base: str,
        wheels: Path | None = None,
        cert: Path | None = None,
        log: Path | None = None,
    ) -> str:
        """The Containerfile's ``target`` on ``base``, tagged :func:`image_tag`; returns the tag."""
        if target not in TARGETS:
            raise ImageError(f"target must be one of {', '.join(TARGETS)}")
        args = ["build", "--network=host", "--pull=never", "--build-arg", f"BASE={base}",
                "--label", f"{SOURCE_LABEL}={source_digest(context)}"]  # fmt: skip
        if wheels:
            args += ["-v", f"{wheels.resolve()}:{BUILD_WHEELS}:ro", "--build-arg", f"PIP_FIND_LINKS={BUILD_WHEELS}"]
        if cert:
            cert = cert.resolve()
            args += ["-v", f"{cert.parent}:{BUILD_CERTS}:ro", "--build-arg", f"PIP_CERT={BUILD_CERTS}/{cert.name}"]
        tag = image_tag(target)
        self.run(*args, "-f", str(context / CONTAINERFILE), "--target", target, "-t", tag, str(context),
                 timeout=1800, log=log)  # fmt: skip
        return tag


def host_sources(root: Path = Path("/etc/apt")) -> list[Path]:
    """The host's apt source files with an entry for :data:`SUITE` or one of its own (``bookworm-updates``,
    ``bookworm-security``), in apt's order; others (a vendor's repository, another release) are left out."""
    files = [root / "sources.list"] + sorted((root / "sources.list.d").glob("*.list"))
    files += sorted((root / "sources.list.d").glob("*.sources"))
    found = []
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        words = {w for line in lines for w in line.split("#", 1)[0].split()}
        if any(w == SUITE or w.startswith(f"{SUITE}-") for w in words):
            found.append(path)
    return found


def default_cert() -> Path | None:
    """The CA bundle the host's own pip is told to use (``PIP_CERT``), if any."""
    value = os.environ.get("PIP_CERT")
    return Path(value) if value and Path(value).is_file() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m paitient.ops.images",
        description="Build the Kubernetes profile's images (singleuser, services) with podman, asking no registry.",
    )
    parser.add_argument("--context", type=Path, default=Path.cwd(), help="the repository root (default: here)")
    parser.add_argument("--base", help=f"an image to build on (default: make {BASE_TAG} with mmdebstrap)")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels pip takes first (a CPU build of torch)")
    parser.add_argument("--cert", type=Path, default=default_cert(), help="the CA bundle pip checks the index with")
    parser.add_argument("--podman-root", type=Path, help="a podman storage of the images' own (default: podman's)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="only these (default: both)")
    parser.add_argument("--log", type=Path, help="append the builds' output here")
    args = parser.parse_args(argv)
    if not (args.context / CONTAINERFILE).is_file():
        parser.error(f"{args.context} holds no {CONTAINERFILE}: run from the repository root or give --context")
    if args.wheels and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels} is not a folder")
    engine = None
    if args.podman_root:
        engine = Engine(args.podman_root)
        engine.prepare()
    builder = Builder(engine)
    try:
        base = args.base
        if base is None:
            if not builder.has(BASE_TAG):
                print(f"making {BASE_TAG} with mmdebstrap", flush=True)
                builder.make_base(log=args.log)
            base = BASE_TAG
        for target in args.target or TARGETS:
            print(f"building {image_tag(target)} on {base}", flush=True)
            builder.build(target, context=args.context, base=base, wheels=args.wheels, cert=args.cert, log=args.log)
        if engine:  # a storage of the images' own: the untagged images earlier builds left go
            builder.run("image", "prune", "--force", timeout=300, log=args.log)
    except ImageError as e:
        sys.exit(f"paitient images: {e}")


if __name__ == "__main__":
    main()
