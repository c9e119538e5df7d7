"""Demo data for ``paitient up``: real public clinical tables, given made-up identities, ingested for real.

The clinical values are real (scikit-learn's breast cancer and diabetes tables, the German Breast Cancer
Study Group trial from lifelines). Each row is joined to a generated hospital identity - record number,
name, birth date, address, phone, insurance number - drawn deterministically from one demo hospital
population, so some patients appear in several tables: 150 of the GBSG2 trial patients are in the
breast-cancer table too (one pseudonym within the oncology project), and 60 women of the diabetes
table are oncology patients as well (an unrelated pseudonym in the cardiometabolic project).

The raw sources go to ``<state_dir>/sources/<project>/<dataset>.csv`` (root only), then through the
same pipeline as ``paitient ingest`` with the specs in ``demo_specs/``. Running it again publishes
nothing unless the spec, source or key changed.
"""

from __future__ import annotations

import io
import logging
import os
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from paitient.config import SiteConfig
from paitient.fsutil import atomic_write_bytes
from paitient.services.data import keys, rowindex
from paitient.services.data.ingest import ingest
from paitient.services.data.publish import Published
from paitient.services.data.spec import load_spec

log = logging.getLogger(__name__)

SPEC_DIR = Path(__file__).parent / "demo_specs"
DEMO: tuple[tuple[str, str], ...] = (
    ("oncology", "breast_cancer"),
    ("oncology", "gbsg2"),
    ("cardiometabolic", "diabetes"),
)
SEED = 20261128

_FEMALE = (
    "Anna",
    "Maria",
    "Ursula",
    "Monika",
    "Petra",
    "Elisabeth",
    "Sabine",
    "Renate",
    "Helga",
    "Karin",
    "Brigitte",
    "Ingrid",
    "Erika",
    "Andrea",
    "Gisela",
    "Claudia",
    "Susanne",
    "Gabriele",
    "Christa",
    "Christine",
    "Hildegard",
    "Birgit",
    "Barbara",
    "Julia",
    "Emma",
    "Sophie",
    "Olivia",
    "Amelia",
)
_MALE = (
    "Peter",
    "Michael",
    "Thomas",
    "Andreas",
    "Wolfgang",
    "Klaus",
    "Jürgen",
    "Günter",
    "Stefan",
    "Christian",
    "Uwe",
    "Werner",
    "Horst",
    "Frank",
    "Dieter",
    "Manfred",
    "Gerhard",
    "Hans",
    "Bernd",
    "Joachim",
    "Ralf",
    "Oliver",
    "George",
    "Harry",
    "Jack",
    "Noah",
    "James",
    "William",
)
_SURNAMES = (
    "Müller",
    "Schmidt",
    "Schneider",
    "Fischer",
    "Weber",
    "Meyer",
    "Wagner",
    "Becker",
    "Schulz",
    "Hoffmann",
    "Schäfer",
    "Koch",
    "Bauer",
    "Richter",
    "Klein",
    "Wolf",
    "Schröder",
    "Neumann",
    "Schwarz",
    "Zimmermann",
    "Braun",
    "Krüger",
    "Hofmann",
    "Hartmann",
    "Lange",
    "Schmitt",
    "Werner",
    "Krause",
    "Meier",
    "Lehmann",
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Evans",
)
_STREETS = (
    "Hauptstraße",
    "Schulstraße",
    "Gartenstraße",
    "Bahnhofstraße",
    "Dorfstraße",
    "Bergstraße",
    "Lindenstraße",
    "Waldweg",
    "Birkenweg",
    "Kirchplatz",
    "Am Markt",
    "Rosenallee",
    "Mühlenweg",
)
# (postcode area, city): few areas, so the demo datasets reach k >= 5 with two-digit postcode prefixes
_AREAS = (("10", "Berlin"), ("12", "Berlin"), ("13", "Berlin"), ("14", "Potsdam"))


def _identities(n: int, rng: np.random.Generator, female: np.ndarray, start: int) -> pd.DataFrame:
    given = np.where(female, rng.choice(_FEMALE, n), rng.choice(_MALE, n))
    family = rng.choice(_SURNAMES, n)
    area = rng.integers(0, len(_AREAS), n)
    return pd.DataFrame(
        {
            "mrn": [f"{start + i:08d}" for i in range(n)],
            "name": [f"{g} {f}" for g, f in zip(given, family, strict=True)],
            "street": [f"{s} {h}" for s, h in zip(rng.choice(_STREETS, n), rng.integers(1, 120, n), strict=True)],
            "postcode": [f"{_AREAS[a][0]}{rng.integers(100, 999)}" for a in area],
            "city": [_AREAS[a][1] for a in area],
            "phone": [f"+49 30 {rng.integers(1000000, 9999999)}" for _ in range(n)],
            "insurance_no": [f"{chr(65 + rng.integers(0, 26))}{rng.integers(100000000, 999999999)}" for _ in range(n)],
        }
    )


def _day(start: date, span_days: int, rng: np.random.Generator, n: int) -> list[date]:
    return [start + timedelta(days=int(d)) for d in rng.integers(0, span_days, n)]


def _years_before(when: list[date], years: np.ndarray, rng: np.random.Generator) -> list[date]:
    return [
        w - timedelta(days=int(round(y * 365.25)) + int(rng.integers(0, 365))) for w, y in zip(when, years, strict=True)
    ]


def gbsg2_table() -> pd.DataFrame:
    """The GBSG2 table lifelines ships, read from its file: importing lifelines (its fitters, scipy's
    statistics) would take longer than the rest of the demo's data together, on every ``paitient up``."""
    from importlib.util import find_spec

    spec = find_spec("lifelines")
    if spec is None or spec.origin is None:
        raise RuntimeError("the demo data needs lifelines' GBSG2 table; run: bash scripts/setup install")
    return pd.read_csv(Path(spec.origin).parent / "datasets" / "gbsg2.csv", engine="python")


def demo_sources() -> dict[str, pd.DataFrame]:
    """The three raw demo tables, with identities, exactly as a hospital export might deliver them."""
    from sklearn.datasets import load_breast_cancer, load_diabetes

    rng = np.random.default_rng(SEED)
    # GBSG2 trial: 686 women; surgery 1984-1989, follow-up `time` days later
    g = gbsg2_table()
    gid = _identities(len(g), rng, np.ones(len(g), bool), start=4_100_000)
    surgery = _day(date(1984, 7, 1), 5 * 365, rng, len(g))
    gid["birth_date"] = _years_before(surgery, g["age"].to_numpy(), rng)
    gbsg2 = pd.concat([gid, g], axis=1)
    gbsg2["surgery_date"] = surgery
    gbsg2["last_followup"] = [s + timedelta(days=int(t)) for s, t in zip(surgery, g["time"], strict=True)]

    # Breast cancer biopsies: 569 women; the first 150 malignant ones are GBSG2 patients, biopsied before surgery
    b = load_breast_cancer(as_frame=True).frame
    bid = _identities(len(b), rng, np.ones(len(b), bool), start=4_200_000)
    bid["birth_date"] = _years_before(_day(date(1995, 1, 1), 20 * 365, rng, len(b)), rng.uniform(28, 85, len(b)), rng)
    diagnosis = _day(date(1995, 1, 1), 25 * 365, rng, len(b))
    malignant = np.flatnonzero(b["target"].to_numpy() == 0)[:150]
    for i, j in enumerate(malignant):
        bid.loc[j, gid.columns] = gid.loc[i, gid.columns].to_numpy()
        bid.loc[j, "birth_date"] = gbsg2.loc[i, "birth_date"]
        diagnosis[j] = surgery[i] - timedelta(days=int(rng.integers(7, 60)))
    b.insert(0, "diagnosis_date", diagnosis)
    b.insert(1, "age", [int((d - bd).days // 365.25) for d, bd in zip(diagnosis, bid["birth_date"], strict=True)])
    breast = pd.concat([bid, b], axis=1)

    # Diabetes: 442 adults, baseline visit and a follow-up one year later (the target is measured then);
    # 60 women of it are oncology patients too
    d = load_diabetes(scaled=False, as_frame=True).frame.rename(columns={"target": "progression"})
    did = _identities(len(d), rng, d["sex"].to_numpy() == 1, start=4_300_000)
    baseline = _day(date(2015, 1, 1), 8 * 365, rng, len(d))
    did["birth_date"] = _years_before(baseline, d["age"].to_numpy(), rng)
    births = breast["birth_date"].tolist()  # looked up ~40,000 times below: a list, not the frame
    ages = d["age"].tolist()
    shared = [i for i in range(len(breast)) if births[i] < date(1975, 1, 1)][:200]
    women = np.flatnonzero(d["sex"].to_numpy() == 1)
    used = 0
    for j in women:
        if used == 60:
            break
        for i in shared:
            bd = births[i]
            when = bd + timedelta(days=int(ages[j] * 365.25) + 100)
            if date(2015, 1, 1) <= when <= date(2023, 12, 31):
                did.loc[j, gid.columns] = breast.loc[i, gid.columns].to_numpy()
                did.loc[j, "birth_date"] = bd
                baseline[j] = when
                shared.remove(i)
                used += 1
                break
    did["email"] = [f"{n.split()[0].lower()}.{n.split()[1].lower()}{k}@mail.example" for k, n in enumerate(did["name"])]
    diabetes = pd.concat([did, d], axis=1)
    diabetes["baseline_date"] = baseline
    diabetes["followup_date"] = [x + timedelta(days=int(rng.integers(350, 380))) for x in baseline]
    return {"breast_cancer": breast, "gbsg2": gbsg2, "diabetes": diabetes}


def _write_source(path: Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n")
    data = buf.getvalue().encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return
    for d in (path.parent.parent, path.parent):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    atomic_write_bytes(path, data, mode=0o600)


def publish_demo(site: SiteConfig, *, operator: str = "system") -> list[str]:
    """Publish the demo datasets of the site's demo projects; returns what was published (skips unchanged).

    Creates the pseudonymisation key if there is none. Datasets of projects the site does not have (or
    does not list) are left out.
    """
    keys.ensure_key(site)
    wanted = [(p, d) for p, d in DEMO if any(pr.name == p and d in pr.datasets for pr in site.projects)]
    if not wanted:
        return []
    frames = demo_sources()
    done = []
    for project, dataset in wanted:
        source = site.state_dir / "sources" / project / f"{dataset}.csv"
        _write_source(source, frames[dataset])
        spec = load_spec(SPEC_DIR / f"{dataset}.toml", source=source)
        result = ingest(site, spec, operator=operator, skip_unchanged=True)
        if isinstance(result, Published):  # None: unchanged (an Outcome comes only from a dry run)
            log.info("demo data: published %s/%s version %d", project, dataset, result.version)
            done.append(f"{project}/{dataset}@v{result.version}")
    for project in sorted({p for p, _ in wanted}):  # versions published before row detection existed
        for r in rowindex.reindex(site, project=project):
            log.info("demo data: indexed %s/%s version %d", r.project, r.dataset, r.version)
    return done
