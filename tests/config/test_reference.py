"""The example site file, docs/config.md and `paitient config` are made from the settings model."""

import tomllib
from pathlib import Path

import pytest

from paitient.config import SECTIONS, Project, load, parse
from paitient.config.__main__ import documents, main, stale
from paitient.config.reference import REGENERATE, default, tables

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", sorted(documents()))
def test_generated_documents_are_current(rel):
    text = (REPO / rel).read_text(encoding="utf-8")
    assert text == documents()[rel], f"{rel} is stale; regenerate it with: {REGENERATE}"


def test_the_check_names_a_stale_document_and_the_command(tmp_path, capsys):
    for rel, text in documents().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert main(["--check", str(tmp_path)]) == 0 and stale(tmp_path) == []
    (tmp_path / "docs" / "config.md").write_text("# old\n")
    assert main(["--check", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"docs/config.md is stale; regenerate it with: {REGENERATE}\n"
    assert main(["--write-docs", str(tmp_path)]) == 0 and stale(tmp_path) == []


def test_the_example_keeps_defaults_commented_and_sets_a_directory_and_two_projects():
    path = REPO / "hub_config" / "site.example.toml"
    raw = tomllib.loads(path.read_text())
    assert set(raw) == {*SECTIONS, "projects"}
    assert {name for name, table in raw.items() if table} == {"directory", "projects"}  # the rest: commented defaults
    assert [p["name"] for p in raw["projects"]] == ["oncology", "cardiometabolic"]
    site = load(path)
    assert site.directory.group_base and site.directory.bind_dn_template
    assert site.egress_for("cardiometabolic").max_rows_per_output == 10
    text = path.read_text()
    for name, cls in SECTIONS.items():
        for key, trait in cls.settings().items():
            assert f"\n# {key} = {default(trait)}\n" in text or f"\n{key} = " in text, f"[{name}] {key}"
    # uncommenting every default of a section gives the same configuration
    defaults = "\n".join(
        f"[{name}]\n" + "\n".join(f"{key} = {default(t)}" for key, t in cls.settings().items())
        for name, cls in SECTIONS.items()
    )
    assert parse(tomllib.loads(defaults)) == parse({})


def test_the_markdown_reference_names_every_table_and_setting_with_its_help():
    text = (REPO / "docs" / "config.md").read_text()
    for label, cls in tables():
        assert f"\n## {label}\n" in text
        for key in cls.settings():
            assert f"\n### `{key}`\n" in text, f"{label} {key}"
    assert "site.egress_for(project)" in text and "site.egress_for_user(projects)" in text
    assert r"/data/\<project>/\<dataset>" in text  # not read as HTML


def test_project_settings_are_documented_in_the_example():
    text = (REPO / "hub_config" / "site.example.toml").read_text().split("[[projects]]", 2)[2]
    for key in Project.settings():
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key
