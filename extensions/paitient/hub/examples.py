"""The example notebooks each user finds in their home.

The examples (the notebooks and their README) live in the repository's ``notebooks/`` and ship inside the
package as ``paitient/examples`` (a link to that folder, whose files a build copies in): an editable install
reads them from the source tree, a copied one from the installed package, and a container image built from
the package carries them too; nothing else needs installing or keeping in step.

The spawner calls :func:`provide` as root before every server start. An example missing from the home is
added, owned by the account; a name already taken in the home (the user's edited copy, their own file, a
link) is never touched, so a later start only brings back what was deleted. Writing as root into a folder
the user controls is done through a descriptor of the home opened without following links: every file is
created new under a temporary name (``O_EXCL``), owned and written through that descriptor, and linked to
its name only if the name is still free, so no path the user prepared can redirect the write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from importlib import resources
from pathlib import Path

EXAMPLES = resources.files("paitient") / "examples"
"""The shipped examples (a folder of the installed package)."""


class ExamplesError(RuntimeError):
    """The examples could not be read or added; the message says what to do."""


def shipped() -> dict[str, bytes]:
    """Name -> content of every shipped example (notebooks and README)."""
    files = {
        entry.name: entry.read_bytes()
        for entry in EXAMPLES.iterdir()
        if entry.is_file() and entry.name.endswith((".ipynb", ".md"))
    }
    if not any(name.endswith(".ipynb") for name in files):
        raise ExamplesError(f"no example notebooks in {EXAMPLES}: reinstall paitient (its package data ships them)")
    return files


def provide(home: str | os.PathLike[str], uid: int, gid: int, files: dict[str, bytes] | None = None) -> list[str]:
    """Add to ``home`` (which ``uid`` must own) the examples it lacks, owned by ``uid``/``gid``, mode 0600.

    Returns the names added, in order. Names present in any form are left as they are.
    """
    files = shipped() if files is None else files
    try:
        home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ExamplesError(f"cannot open the home {home} for the examples: {e.strerror}") from e
    try:
        owner = os.fstat(home_fd).st_uid
        if owner != uid:
            raise ExamplesError(f"{home} belongs to uid {owner}, not {uid}: no examples written into it")
        added = [name for name in sorted(files) if _add(home_fd, name, files[name], uid, gid)]
        if added:
            os.fsync(home_fd)
        return added
    finally:
        os.close(home_fd)


def _taken(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _add(dir_fd: int, name: str, data: bytes, uid: int, gid: int) -> bool:
    """Publish ``data`` as ``name`` in ``dir_fd`` unless the name is taken; True when it was added."""
    if Path(name).name != name or name.startswith("."):
        raise ExamplesError(f"example name {name!r} is not a plain file name")
    if _taken(dir_fd, name):
        return False
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # linkat without following: the name is created only if still free, never replaced
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):  # linked or not, the temporary name goes (unless no longer a file)
            os.unlink(tmp, dir_fd=dir_fd)
