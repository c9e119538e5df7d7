"""Documents made from the settings model: the example site file, ``docs/config.md``, the settings listing of
``paitient config --help-all`` and the effective configuration as TOML.

The model is the one source: help texts, defaults and types come from the traits; this module only adds the
sample values an operator starts from (a directory and two projects).
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

from traitlets import TraitType

from paitient.config.model import Model
from paitient.config.projects import Budget, Project
from paitient.config.site import SECTIONS, SiteConfig

REGENERATE = "python -m paitient.config --write-docs"
EXAMPLE_PATH = "hub_config/site.example.toml"
MARKDOWN_PATH = "docs/config.md"
RULE = "# " + "-" * 110

DEMO = "ou=groups,dc=hospital,dc=example"
EXAMPLE_SECTIONS: dict[str, dict[str, Any]] = {
    "directory": {
        "bind_dn_template": ["uid={username},ou=people,dc=hospital,dc=example"],
        "group_base": DEMO,
        "steward_group": f"cn=data-stewards,{DEMO}",
    },
}
EXAMPLE_PROJECTS: list[dict[str, Any]] = [
    {
        "name": "oncology",
        "group": f"cn=oncology,{DEMO}",
        "description": "Tumour classification and survival",
        "datasets": ["breast_cancer", "gbsg2"],
        "stewards": ["sam", "tina"],
        "approvals": 1,
        "budget": {"epsilon": 10.0, "delta": 1e-5},
        "budgets": {"gbsg2": {"epsilon": 5.0, "delta": 1e-5}},
    },
    {
        "name": "cardiometabolic",
        "group": f"cn=cardiometabolic,{DEMO}",
        "description": "Disease progression in diabetes",
        "datasets": ["diabetes"],
        "stewards": ["sam", "tina"],
        "budget": {"epsilon": 10.0, "delta": 1e-5},
        "egress": {"max_rows_per_output": 10, "daily_rows": 100},
    },
]


# --------------------------------------------------------------------------------------------------
# TOML values


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """``value`` written as TOML (inline tables for tables); big whole numbers get ``_`` separators."""
    if isinstance(value, Model):
        value = value.values()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 1_000_000 else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def effective_toml(site: SiteConfig) -> str:
    """Every setting of ``site`` as a site file (it loads back to the same configuration)."""
    origin = site.source or "the embedded demo default"
    lines = [f"# The effective site configuration of {origin}, validated (paitient config)."]
    for name in SECTIONS:
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {toml_value(v)}" for key, v in getattr(site, name).values().items()]
    for project in site.projects:
        lines += ["", "[[projects]]"]
        lines += [f"{key} = {toml_value(v)}" for key, v in project.values().items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The settings, in the order they are documented


def tables() -> Iterator[tuple[str, type[Model]]]:
    """(how the file names the table, its model class) for every documented table."""
    for name, cls in SECTIONS.items():
        yield f"[{name}]", cls
    yield "[[projects]]", Project
    yield "[[projects]] budget = { epsilon, delta }", Budget


def description(cls: type[Model]) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def kind(trait: TraitType) -> str:
    return getattr(trait, "expects", "a value")


def default(trait: TraitType) -> str:
    value = trait.default()
    return toml_value(value)


def blocks(text: str) -> list[tuple[str, str]]:
    """Help or description text as ("para" | "item", text) blocks: a line starting with "- " begins a list
    item, an indented line continues the block before it, a blank line ends a paragraph, and other lines are
    joined into the paragraph they wrap."""
    out: list[tuple[str, str]] = []
    joinable = False
    for line in text.splitlines():
        if not line.strip():
            joinable = False
        elif line.startswith("- "):
            out.append(("item", line[2:].strip()))
            joinable = False
        elif out and (line.startswith(" ") or joinable):
            out[-1] = (out[-1][0], f"{out[-1][1]} {line.strip()}")
        else:
            out.append(("para", line.strip()))
            joinable = True
    return out


def _wrapped(text: str, width: int, lead: str = "") -> list[str]:
    lines: list[str] = []
    previous = ""
    for block, body in blocks(text):
        if block == previous == "para":
            lines.append("")
        previous = block
        if block == "item":
            lines += textwrap.wrap(body, width, initial_indent=lead + "- ", subsequent_indent=lead + "  ")
        else:
            lines += textwrap.wrap(body, width, initial_indent=lead, subsequent_indent=lead)
    return lines


def _comment(text: str, width: int = 112) -> list[str]:
    return [f"# {line}".rstrip() for line in _wrapped(text, width - 2)]


def _setting(
    key: str, trait: TraitType, values: Mapping[str, Any], *, documented: bool = True, defaults: bool = True
) -> list[str]:
    lines = _comment(trait.help) if documented else []
    if key in values:
        if documented and defaults and toml_value(values[key]) != default(trait):
            lines.append(f"# Default: {default(trait)}")
        lines.append(f"{key} = {toml_value(values[key])}")
    else:
        lines.append(f"# {key} = {default(trait)}")
    return lines


def example_toml() -> str:
    """``hub_config/site.example.toml``: every setting with its help; defaults commented out, sample values set."""
    lines = [
        "# paitient site configuration: every setting, documented, with its default.",
        "#",
        f"# Generated from paitient's settings model by `{REGENERATE}`:",
        "# edit the model (paitient/config), not this file.",
        "#",
        "# Copy it (e.g. to /etc/paitient/site.toml, owner root, mode 0644 or stricter) and pass it with",
        "# `paitient up --site /etc/paitient/site.toml`. Without a site file, paitient runs the embedded demo: a",
        "# private directory on loopback with a demo hospital (see paitient/ops/demo.py).",
        "# A commented-out setting shows its default. An unknown key or a bad value stops paitient with an error",
        "# that names the file and the key; `paitient config --site=FILE` prints what paitient reads from a file.",
    ]
    for name, cls in SECTIONS.items():
        lines += ["", RULE, f"[{name}]", *_comment(description(cls))]
        for key, trait in cls.settings().items():
            lines += ["", *_setting(key, trait, EXAMPLE_SECTIONS.get(name, {}))]
    lines += ["", RULE, *_comment(description(Project)), "#", *_comment(description(Budget))]
    for index, project in enumerate(EXAMPLE_PROJECTS):
        lines += ["", "[[projects]]"]
        for key, trait in Project.settings().items():
            if index == 0:
                lines += [*_setting(key, trait, project, defaults=False), ""]
            elif key in project:
                lines += _setting(key, trait, project, documented=False)
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """``docs/config.md``: the reference of every setting."""
    lines = [
        "# Site configuration reference",
        "",
        f"<!-- Generated from the settings model by `{REGENERATE}`; edit the model, not this file. -->",
        "",
        "paitient reads one site file (TOML), given as `paitient up --site FILE`; without one it runs the "
        "embedded demo. Every setting below is optional unless it says *Required*; an unknown key or a bad "
        "value stops paitient with an error that names the file, the key and what is allowed. "
        f"[`{EXAMPLE_PATH}`](../{EXAMPLE_PATH}) is a commented example to start from.",
        "",
        "- `paitient config --site=FILE` prints the effective, validated configuration of a file.",
        "- `paitient config --help-all` lists every setting with its section, help and default.",
    ]
    for label, cls in tables():
        lines += ["", f"## {label}", "", *_markdown_text(description(cls))]
        for key, trait in cls.settings().items():
            lines += ["", f"### `{key}`", "", f"{kind(trait).capitalize()}; default `{default(trait)}`.", ""]
            lines += _markdown_text(trait.help)
    lines += ["", "## In code", "", *_markdown_text(inspect.cleandoc(IN_CODE))]
    return "\n".join(lines) + "\n"


IN_CODE = """
Root-side code reads the validated, frozen site object (`paitient.config.load(path)`; `None` gives the
embedded default):
- `site.<section>.<key>`, e.g. `site.server.output_cap_message_bytes`; `site.state_dir`, `site.data_root`,
  `site.key_file`, `site.run_dir`;
- `site.project(name)` and `site.project(name).budget_for(dataset)`;
- `site.egress_for(project)`: the project's `egress = { ... }` over `[egress]`;
- `site.egress_for_user(projects)`: the strictest of each egress limit over a user's projects;
- `site.to_dict()` for JSON, `site.replace(...)` for a changed, validated copy.
A trait of another configurable that carries a site setting is made with
`paitient.config.site_trait(Section, "key")`, which copies the setting's type, default, help and rule.
"""


def _markdown_text(text: str) -> list[str]:
    out: list[str] = []
    previous = ""
    for block, body in blocks(text):
        if out and not (block == previous == "item"):
            out.append("")
        body = _md_escape(body)
        out.append(f"- {body}" if block == "item" else body)
        previous = block
    return out


def _md_escape(text: str) -> str:
    """Escape what Markdown would read as HTML (``<project>``), outside code spans."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def help_all(width: int = 100) -> str:
    """The site settings, for ``paitient config --help-all``."""
    lines = ["Site settings (the site file, TOML; `paitient config --site=FILE` prints a file's effective values)"]
    lines.append("=" * len(lines[0]))
    for label, cls in tables():
        lines += ["", label, *_wrapped(description(cls), width, "  ")]
        for key, trait in cls.settings().items():
            lines += ["", f"  {key} = {default(trait)}    ({kind(trait)})", *_wrapped(trait.help, width, "      ")]
    return "\n".join(lines) + "\n"
