"""``python -m paitient.config --write-docs [ROOT]``: regenerate the documents made from the settings model.

Writes ``hub_config/site.example.toml`` and ``docs/config.md`` under ROOT (default: the source checkout this
package lies in); ``--check`` only says which of them are stale (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paitient.config.reference import EXAMPLE_PATH, MARKDOWN_PATH, REGENERATE, example_toml, markdown
from paitient.fsutil import atomic_write_text

CHECKOUT = Path(__file__).resolve().parents[3]


def documents() -> dict[str, str]:
    """Path in the checkout -> the text it must have."""
    return {EXAMPLE_PATH: example_toml(), MARKDOWN_PATH: markdown()}


def stale(root: Path) -> list[str]:
    """The generated documents under ``root`` that differ from what the model makes now."""
    out = []
    for rel, text in documents().items():
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paitient.config", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-docs", action="store_true", help="write the generated documents")
    action.add_argument("--check", action="store_true", help="exit 1 if a generated document is stale")
    parser.add_argument("root", nargs="?", default=str(CHECKOUT), help="the source checkout (default: %(default)s)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not (root / "hub_config").is_dir() or not (root / "docs").is_dir():
        parser.error(f"{root} is not a paitient source checkout (no hub_config/ and docs/); name one")
    if args.check:
        old = stale(root)
        for rel in old:
            print(f"{rel} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
        return 1 if old else 0
    for rel, text in documents().items():
        atomic_write_text(root / rel, text)
        print(f"wrote {root / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
