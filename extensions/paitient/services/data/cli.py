"""``paitient ingest SPEC`` and ``paitient datasets``: the operator's side of the data.

Both run on the data integration centre's side (as root), never inside the workspace.
"""

from __future__ import annotations

import json

from traitlets import Bool, Unicode

from paitient.app import PaitientCommand
from paitient.catalogue import scan
from paitient.services.data.publish import versions


class IngestCommand(PaitientCommand):
    name = "ingest"
    description = (
        "Pseudonymise a source table (CSV, Parquet, FHIR NDJSON) as its spec says and publish it as the next "
        "version of a project's dataset. The spec format is described in docs/ingest.md."
    )
    examples = """
paitient ingest --init-key            # create the site's pseudonymisation key (once)
paitient ingest SPEC.toml             # check, transform and publish
paitient ingest --dry-run SPEC.toml   # every check, publish nothing
"""
    spec = Unicode("", help="The ingest spec (TOML); also the first positional argument.").tag(config=True)
    source = Unicode("", help="Read this source instead of the spec's own `source`.").tag(config=True)
    dry_run = Bool(False, help="Run every check and transform, publish nothing.").tag(config=True)
    init_key = Bool(False, help="Create the pseudonymisation key (site key_file) if missing, check it.").tag(
        config=True
    )

    aliases = {**PaitientCommand.aliases, "source": "IngestCommand.source", "spec": "IngestCommand.spec"}
    flags = {
        "dry-run": ({"IngestCommand": {"dry_run": True}}, "Run every check, publish nothing."),
        "init-key": ({"IngestCommand": {"init_key": True}}, "Create the pseudonymisation key if missing."),
    }

    def parse_command_line(self, argv=None):
        super().parse_command_line(argv)
        if self.extra_args:
            self.spec = self.extra_args[0]

    def start(self) -> None:
        from paitient.services.data import ingest, keys
        from paitient.services.data import spec as specs
        from paitient.services.data.errors import IngestRefused

        self.require_root()
        site = self.load_site()
        if self.init_key:
            try:
                path = keys.ensure_key(site)
            except IngestRefused as e:
                self.fail(str(e), code=1)
            print(f"pseudonymisation key ready: {path} (back it up: a new key changes every pseudonym)")
            if not self.spec:
                return
        if not self.spec:
            self.fail("name an ingest spec: paitient ingest SPEC.toml (see docs/ingest.md)")
        try:
            spec = specs.load_spec(self.spec, self.source or None)
            result = ingest.ingest(site, spec, dry_run=self.dry_run)
        except IngestRefused as e:
            self.fail(str(e), code=1)
        if isinstance(result, ingest.Outcome):
            info = result.info
            print(
                f"dry run, nothing published: {spec.project}/{spec.dataset} would have {info['rows']} rows, "
                f"{len(info['columns'])} columns, k = {info['k']} ({info['k_unit']})"
            )
            return
        if result is None:
            return
        m = result.manifest
        print(
            f"published {spec.project}/{spec.dataset} version {result.version}: {m['rows']} rows, "
            f"{len(m['columns'])} columns, k = {m['k']} ({m['k_unit']}) -> {result.path}"
        )


class DatasetsCommand(PaitientCommand):
    name = "datasets"
    description = (
        "List the published datasets: current version, rows, columns, k, when and by whom. With --reindex, "
        "build the row-detection indexes (egress gate) of versions that have none or an outdated one."
    )
    examples = """
paitient datasets                     # what is published
paitient datasets --reindex           # index versions published before row detection, or after a key change
paitient datasets --reindex-all       # rebuild every version's index
"""
    project = Unicode("", help="Only this project's datasets.").tag(config=True)
    as_json = Bool(False, help="Print JSON (one object per dataset) instead of a table.").tag(config=True)
    reindex = Bool(
        False, help="Build the row-detection index of every published version that lacks a usable one (root)."
    ).tag(config=True)
    reindex_all = Bool(False, help="Rebuild the row-detection index of every published version (root).").tag(
        config=True
    )

    aliases = {**PaitientCommand.aliases, "project": "DatasetsCommand.project"}
    flags = {
        "json": ({"DatasetsCommand": {"as_json": True}}, "Print JSON instead of a table."),
        "reindex": ({"DatasetsCommand": {"reindex": True}}, "Build missing or outdated row-detection indexes."),
        "reindex-all": ({"DatasetsCommand": {"reindex_all": True}}, "Rebuild every row-detection index."),
    }

    def start(self) -> None:
        if self.reindex or self.reindex_all:
            self._reindex()
            return
        site = self.load_site()
        infos = [i for i in scan(site.data_root) if not self.project or i.project == self.project]

        def all_versions(info) -> list[int]:
            return versions(info.path.parent if info.path.name == "current" else info.path)

        if self.as_json:
            out = [{**i.manifest, "path": str(i.path), "versions": all_versions(i)} for i in infos]
            print(json.dumps(out, indent=2, sort_keys=True))
            return
        if not infos:
            print(f"no datasets published under {site.data_root}")
            return
        header = ("project", "dataset", "version", "of", "rows", "cols", "k", "created", "operator")
        rows = [header]
        for i in infos:
            m = i.manifest
            rows.append(
                (
                    i.project,
                    i.name,
                    str(i.version),
                    str(len(all_versions(i))),
                    str(i.rows),
                    str(len(i.columns)),
                    "-" if i.k is None else str(i.k),
                    m.get("created", ""),
                    m.get("operator", ""),
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())

    def _reindex(self) -> None:
        from paitient.services.data import rowindex

        self.require_root()
        site = self.load_site()
        try:
            done = rowindex.reindex(site, project=self.project, every=self.reindex_all)
        except rowindex.IndexRefused as e:
            self.fail(str(e), code=1)
        for r in done:
            print(f"indexed {r.project}/{r.dataset} version {r.version}: {r.entries:,} entries -> {r.path}")
        if not done:
            print("every published version has a usable row-detection index; nothing to do")
