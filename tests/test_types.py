"""mypy: the kernel zone and the pure rules pass it, and the project's configuration holds them to strict flags.

The first test is the type check CI runs (``cd extensions && mypy paitient/kernel paitient/rules``); the
second shows the configuration is what makes it strict: the same faulty module is refused in the kernel
and rules zones and let through elsewhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "pyproject.toml"

PROBE = """\
import json


def untyped(x):
    return x


def parsed(text: str) -> dict[str, int]:
    return json.loads(text)


def ignored() -> int:
    return "one"  # type: ignore
"""


def mypy(*targets: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(CONFIG), "--cache-dir", str(cache), *targets],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_kernel_zone_and_rules_pass_mypy(tmp_path):
    result = mypy("paitient/kernel", "paitient/rules", cwd=REPO / "extensions", cache=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found in "), result.stdout


def test_the_configuration_is_strict_for_kernel_and_rules_only(tmp_path):
    src = tmp_path / "src"
    (src / "paitient").mkdir(parents=True)
    (src / "paitient" / "__init__.py").write_text("")
    for zone in ("kernel", "rules", "server"):
        (src / "paitient" / zone).mkdir()
        (src / "paitient" / zone / "__init__.py").write_text("")
        (src / "paitient" / zone / "probe.py").write_text(PROBE)
    result = mypy("paitient", cwd=src, cache=tmp_path / "cache")
    found: dict[str, set[str]] = {}
    for path, code in re.findall(r"^paitient/(\w+)/probe\.py:\d+: error: .*\[([\w-]+)\]$", result.stdout, re.M):
        found.setdefault(path, set()).add(code)
    strict = {"no-untyped-def", "no-any-return", "ignore-without-code"}
    assert found == {"kernel": strict, "rules": strict}, result.stdout
