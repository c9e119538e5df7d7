"""The image builder's own decisions, without podman: which apt sources the base takes, and when an image is
older than the tree (tests/kubernetes/test_images.py builds and runs the images)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from paitient.ops.images import Builder, ImageError, host_sources, source_digest

REPO = Path(__file__).resolve().parents[2]


def test_the_base_takes_the_hosts_sources_for_bookworm_and_its_updates_only(tmp_path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text("# deb http://mirror.invalid/debian bookworm main\n")  # commented out
    (apt / "sources.list.d" / "vendor.list").write_text("deb [arch=amd64] https://vendor.invalid/apt nodistro main\n")
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    (apt / "sources.list.d" / "old.list").write_text("deb http://mirror.invalid/debian bullseye main\n")
    (apt / "sources.list.d" / "security.list").write_text("deb http://mirror.invalid/security bookworm-security main\n")
    apt_order = [apt / "sources.list.d" / "security.list", apt / "sources.list.d" / "debian.sources"]
    assert host_sources(apt) == apt_order
    (apt / "sources.list").write_text("deb http://mirror.invalid/debian bookworm main # the mirror\n")
    assert host_sources(apt) == [apt / "sources.list", *apt_order]


def test_an_image_is_older_than_a_tree_whose_sources_changed_but_not_than_its_caches(tmp_path):
    tree = tmp_path / "tree"
    for part in ("pyproject.toml", "README.md", "extensions", "kernels"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, tree / part, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(source, tree / part)
    built = source_digest(tree)
    # what tools write beside the sources does not make the image old
    (tree / "extensions" / ".mypy_cache").mkdir()
    (tree / "extensions" / ".mypy_cache" / "cache.db").write_bytes(b"x")
    (tree / "extensions" / "paitient" / "__pycache__").mkdir(exist_ok=True)
    (tree / "extensions" / "paitient" / "__pycache__" / "x.pyc").write_bytes(b"x")
    (tree / "extensions" / "paitient.egg-info").mkdir()
    (tree / "extensions" / "paitient.egg-info" / "PKG-INFO").write_text("x")
    assert source_digest(tree) == built
    # an edit, a new module, the Containerfile: each does
    edited = tree / "extensions" / "paitient" / "__init__.py"
    edited.write_text(edited.read_text() + "\n")
    assert source_digest(tree) != built
    edited.write_text(edited.read_text()[:-1])
    assert source_digest(tree) == built
    (tree / "extensions" / "paitient" / "new.py").write_text("")
    assert source_digest(tree) != built
    (tree / "extensions" / "paitient" / "new.py").unlink()
    (tree / "kernels" / "image" / "Containerfile").write_text("FROM scratch\n")
    assert source_digest(tree) != built


def test_a_host_with_no_source_for_bookworm_gets_the_reason_and_what_to_do():
    with pytest.raises(
        ImageError, match=r"no apt source of this host names bookworm .* or build on an image with --base"
    ):
        Builder().make_base(sources=[])
