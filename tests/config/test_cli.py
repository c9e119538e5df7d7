"""`paitient config`: every site setting with --help-all, the effective configuration of a site file."""

import subprocess
import sys
import tomllib
from pathlib import Path

from paitient.config import load, parse
from paitient.config.reference import default, tables

REPO = Path(__file__).resolve().parents[2]


def paitient(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "paitient.cli", "config", *args], capture_output=True, text=True, timeout=60
    )


def test_paitient_config_help_all_lists_every_setting_with_section_help_and_default():
    out = paitient("--help-all")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "--site=<Unicode>" in text  # the command's own options come first
    for label, cls in tables():
        section = text.split(f"\n{label}\n", 1)[1]
        for key, trait in cls.settings().items():
            assert f"\n  {key} = {default(trait)}    (" in section, f"{label} {key}"
            first_words = " ".join(trait.help.split()[:4])
            entry = section.split(f"\n  {key} = ", 1)[1].split("\n\n", 1)[0]
            assert first_words in " ".join(entry.split()), f"{label} {key}: help missing"
    assert "\n[egress]\n" in text and "max_rows_per_output = 20    (a whole number)" in text
    assert "\n[[projects]]\n" in text and "approvals = 1    (a whole number)" in text


def test_paitient_config_prints_the_effective_configuration_and_refuses_a_bad_file(tmp_path):
    example = REPO / "hub_config" / "site.example.toml"
    out = paitient(f"--site={example}")
    assert out.returncode == 0, out.stderr
    assert parse(tomllib.loads(out.stdout)) == load(example).replace(source="")
    bad = tmp_path / "site.toml"
    bad.write_text("[server]\noutput_cap_message_bytes = -1\n")
    out = paitient(f"--site={bad}")
    assert out.returncode == 2 and out.stdout == ""
    assert f"{bad}: [server] output_cap_message_bytes: must be a positive whole number, got -1" in out.stderr


def test_paitient_without_a_subcommand_prints_its_help_and_fails():
    out = subprocess.run([sys.executable, "-m", "paitient.cli"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Run `paitient up` to start the workspace" in out.stdout and "\nSubcommands\n" in out.stdout
