"""Differencing between released tables: does a new count table, together with a project's earlier releases,
reveal a group smaller than the minimum count? Pure.

A released count table is kept in a canonical form (:class:`CountTable`): its *facts*, each a set of
``(variable, category)`` pairs and the number of people in it (a margin or total has fewer pairs than a full
cell), the dataset and version it counts, and its *population*: the recipe's filter, normalised to the values
it lets through per column (``{}`` for everyone), or ``None`` when the table came without a recipe and its
population is unknown.

Three kinds of difference are searched (:func:`compare`):

- ``nested``: the same cells counted over two populations of which one holds the other (a filter that drops
  some patients). Each cell's difference counts the dropped patients in that cell.
- ``margin``: a total or margin minus the sub-cells given for it (in the same table, or in other releases over
  the same population) counts the people of the categories left out.
- ``bins``: two tables binning the same number differently (``40-49`` / ``45-54``): the boundaries of both
  cut the line into pieces, and each piece is a difference of cumulative counts.

A finding is *sure* when both populations are known from recipes (the difference is exact) and otherwise a
suspicion for a steward (the populations of tables without recipes are guessed from their cells).
"""

from __future__ import annotations

import base64
import math
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paitient.rules.values import once_per_value

Pair = tuple[str, str]
Key = frozenset[Pair]

MISSING_LABELS = frozenset({"nan", "none", "<na>", "nat", ""})
"""How a missing value's group is spelt (``recipe_counts`` keeps it): not a bin of a binned variable."""
TOTAL_LABELS = frozenset({"all", "total", "totals", "overall", "sum"})
"""Categories that mark a margin (``pd.crosstab(margins=True)`` writes ``All``); :func:`is_total` reads
their usual longer spellings too."""
_TOTAL = re.compile(
    rf"^(?:grand\s+)?(?:{'|'.join(sorted(TOTAL_LABELS))})(?:\s+(?:ages?|patients|persons|people|cases|groups))?$"
)


def is_total(label: str) -> bool:
    """Does a category mark a margin: ``All``, ``Total``, ``Grand total``, ``All ages``, ``Total patients``, ``Sum``."""
    return _TOTAL.match(" ".join(label.casefold().split())) is not None


COLUMNS_VARIABLE = "(columns)"
"""The variable whose categories are the headers of a table with several count columns."""
MAX_FINDINGS = 50


@dataclass(frozen=True)
class CountTable:
    facts: Mapping[Key, float]
    dataset: str | None = None
    version: int | None = None
    population: Mapping[str, tuple[str, ...]] | None = None
    """Column -> the values the filter lets through; ``{}``: everyone; ``None``: not known."""
    domains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Variable -> every category it has in the dataset (from the recipe's data), where known."""
    members: str | None = None
    """Which rows of the dataset's version the population holds (:func:`members_of`), where known: two
    filters on different columns can let the same rows through, or one the other's."""

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": [[sorted([v, c] for v, c in k), n] for k, n in self.facts.items()],
            "dataset": self.dataset,
            "version": self.version,
            "population": None if self.population is None else {k: list(v) for k, v in self.population.items()},
            "domains": {k: list(v) for k, v in self.domains.items()},
            **({"members": self.members} if self.members is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CountTable:
        pop = data.get("population")
        return cls(
            facts={frozenset((str(v), str(c)) for v, c in pairs): float(n) for pairs, n in data["facts"]},
            dataset=data.get("dataset"),
            version=data.get("version"),
            population=None if pop is None else {str(k): tuple(map(str, v)) for k, v in pop.items()},
            domains={str(k): tuple(map(str, v)) for k, v in (data.get("domains") or {}).items()},
            members=data.get("members") if isinstance(data.get("members"), str) else None,
        )


@dataclass(frozen=True)
class Finding:
    kind: str
    """``nested``, ``margin`` or ``bins``."""
    earlier: tuple[str, ...]
    """The earlier requests the difference is taken with (none: within the new table)."""
    cell: tuple[Pair, ...]
    """The group revealed: (variable, category) pairs; a category may read ``not <a, b>`` or ``[a, b)``."""
    count: float
    sure: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "earlier": list(self.earlier),
            "cell": {v: c for v, c in self.cell},
            "count": self.count,
            "sure": self.sure,
        }

    def describe(self) -> str:
        """What was differenced, without the cell's categories or count (a reason reaches the requester's
        browser; the cell is in :meth:`to_json`, for stewards and the workspace)."""
        with_ = f" with request {', '.join(self.earlier)}" if self.earlier else " within the table"
        what = {"nested": "nested populations", "margin": "a total minus its sub-cells", "bins": "overlapping bins"}
        return f"{what[self.kind]}{with_}"

    def group(self) -> str:
        """The group the difference counts, as a steward reads it (it names categories: stewards only)."""
        return cell_text(self.cell)


def _small(n: float, min_count: int) -> bool:
    return 0 < n < min_count and not math.isclose(n, 0.0, abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Populations


def population_within(inner: Mapping[str, Sequence[str]], outer: Mapping[str, Sequence[str]]) -> bool:
    """Is every person ``inner`` lets through also let through by ``outer`` (filters as per-column sets)?"""
    return all(col in inner and set(inner[col]) <= set(vals) for col, vals in outer.items())


def members_of(mask: Sequence[bool]) -> str:
    """A population as the rows of its dataset's version it holds: one bit a row, compressed (a filter's
    rows come in runs), as text for the table's JSON."""
    bits = np.asarray(mask, dtype=bool)
    packed = np.packbits(bits).tobytes()
    return f"{len(bits)}:" + base64.b64encode(zlib.compress(packed, 9)).decode()


def _rows(members: str) -> Any:
    n, _, packed = members.partition(":")
    return np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(packed)), np.uint8))[: int(n)].astype(bool)


def _within(inner: CountTable, outer: CountTable) -> bool:
    """Is every person ``inner`` counts counted by ``outer`` (of one dataset and version): by the rows both
    hold where known, else by their filters."""
    if inner.members is not None and outer.members is not None:
        a, b = _rows(inner.members), _rows(outer.members)
        return bool(len(a) == len(b) and not (a & ~b).any())
    assert inner.population is not None and outer.population is not None
    return population_within(inner.population, outer.population)


def _same_population(a: CountTable, b: CountTable) -> bool | None:
    """True/False when both are known, None when either is not."""
    if a.population is None or b.population is None:
        return None
    if a.dataset != b.dataset or a.version != b.version:
        return False  # another version holds other patients, whatever the filter
    return _within(a, b) and _within(b, a)


def _comparable(a: CountTable, b: CountTable) -> bool:
    return not (a.dataset and b.dataset and a.dataset != b.dataset)


# ---------------------------------------------------------------------------------------------------
# Nested populations


MAX_SHARED = 4
"""Variables two tables share up to which every grouping of them is compared (2**4 groupings)."""


def _variable_sets(t: CountTable) -> list[frozenset[str]]:
    """The groupings of the table's cells that are not a margin of another of its groupings: one for a
    recipe's table; several for a table that stacks one-way counts (``age_band`` rows, then ``sex`` rows)."""
    sets = {frozenset(v for v, _ in k) for k in t.facts}
    return sorted((s for s in sets if not any(s < o for o in sets)), key=sorted)


def _variables(t: CountTable) -> frozenset[str]:
    """The variables of the table's full cells (the widest grouping; margins have fewer)."""
    sets = _variable_sets(t)
    return max(sets, key=len) if sets else frozenset()


def marginal(t: CountTable, variables: frozenset[str], grouping: frozenset[str] | None = None) -> dict[Key, float]:
    """The table's cells of ``grouping`` (default: its widest) added up over every variable but
    ``variables`` (``frozenset()``: the total)."""
    full = _variables(t) if grouping is None else grouping
    out: dict[Key, float] = defaultdict(float)
    for k, n in t.facts.items():
        if frozenset(v for v, _ in k) == full:
            out[frozenset(p for p in k if p[0] in variables)] += n
    return dict(out)


def _groupings(shared: frozenset[str], known: bool) -> list[frozenset[str]]:
    """The groupings two tables sharing ``shared`` are compared on: every subset (the total too, where both
    populations are known: a category spelt otherwise in one table hides no change of the total), up to
    :data:`MAX_SHARED` shared variables; else the shared ones alone."""
    from itertools import combinations

    names = sorted(shared)
    if len(names) > MAX_SHARED:
        return [shared]
    low = 0 if known else 1
    return [frozenset(c) for r in range(low, len(names) + 1) for c in combinations(names, r)]


def _nested(new: CountTable, rid: str, old: CountTable, min_count: int) -> list[Finding]:
    """Two tables over populations of which one holds the other, compared on what both count: each table's
    cells added up over the variables the other does not have, and over every grouping of those they share
    (the total too, where both are known), so a finer grouping of one population, or a category spelt
    otherwise, does not hide the patients a filter or another version drops or adds."""
    if not _comparable(new, old):
        return []
    known = new.population is not None and old.population is not None
    # Two versions of a dataset differ by the patients added, removed or changed between them, whichever
    # the filters: each shared cell's difference either way counts some of them (a suspicion for a steward).
    versions = known and new.version != old.version
    sure = known and not versions
    inside = False  # the new population lies within the old one (where both are known, of one version)
    if sure:
        if _same_population(new, old):
            return []
        inside = _within(new, old)
        if not (inside or _within(old, new)):
            return []
    out: dict[Key, Finding] = {}
    for gn in _variable_sets(new):
        for go in _variable_sets(old):
            for shared in _groupings(gn & go, known):
                mn, mo = marginal(new, shared, gn), marginal(old, shared, go)
                if sure:
                    big, small = (mo, mn) if inside else (mn, mo)
                elif versions:
                    big, small = mn, mo
                else:
                    # populations unknown: one table counts a subgroup of the other if no cell of it is larger
                    keys = set(mn) | set(mo)
                    if not (set(mn) & set(mo)):
                        continue
                    if all(mn.get(k, 0.0) <= mo.get(k, 0.0) for k in keys):
                        big, small = mo, mn
                    elif all(mo.get(k, 0.0) <= mn.get(k, 0.0) for k in keys):
                        big, small = mn, mo
                    else:
                        continue
                # both recomputed from the data where known: a cell one lists and the other does not is zero
                for k in set(big) | set(small):
                    d = big.get(k, 0.0) - small.get(k, 0.0)
                    if _small(abs(d) if versions else d, min_count):
                        out.setdefault(k, Finding("nested", (rid,), tuple(sorted(k)), abs(d), sure))
    return [out[k] for k in sorted(out, key=sorted)]


# ---------------------------------------------------------------------------------------------------
# Totals minus sub-cells


def _margins(
    facts: Mapping[Key, tuple[float, str]], new_sources: set[str], sure: bool, min_count: int
) -> list[Finding]:
    """Every fact minus the facts one variable finer than it; ``facts`` maps a key to (count, source)."""
    children: dict[Key, dict[str, list[Key]]] = defaultdict(lambda: defaultdict(list))
    for k in facts:
        for pair in k:
            children[k - {pair}][pair[0]].append(k)
    out = []
    for parent, by_var in children.items():
        if parent not in facts:
            continue
        total, source = facts[parent]
        for var, kids in by_var.items():
            if any(v == var for v, _ in parent):
                continue
            sources = {source, *(facts[k][1] for k in kids)}
            if not sources & new_sources:
                continue  # the earlier releases alone; they were checked when released
            rest = total - sum(facts[k][0] for k in kids)
            if _small(rest, min_count):
                given = sorted(c for k in kids for v, c in k if v == var)
                cell = (*sorted(parent), (var, "not " + ", ".join(given)))
                earlier = tuple(sorted(sources - new_sources))
                out.append(Finding("margin", earlier, cell, rest, sure))
    return out


def _pool(tables: Iterable[tuple[str, CountTable]]) -> dict[Key, tuple[float, str]] | None:
    pooled: dict[Key, tuple[float, str]] = {}
    for source, t in tables:
        for k, n in t.facts.items():
            if k in pooled and not math.isclose(pooled[k][0], n, abs_tol=1e-9):
                return None  # the same cell counted differently: not the same population
            pooled.setdefault(k, (n, source))
    return pooled


# ---------------------------------------------------------------------------------------------------
# Overlapping bins

_NUM = r"[-+]?\d+(?:\.\d+)?"
_RANGE = re.compile(rf"^({_NUM})\s*(?:-|–|to)\s*({_NUM})$")
_OPEN_UP = re.compile(rf"^(?:({_NUM})\s*\+|(>=|≥|>)\s*({_NUM}))$")
_OPEN_DOWN = re.compile(rf"^(<=|≤|<)\s*({_NUM})$")
_INTERVAL = re.compile(rf"^([\[(])\s*({_NUM})\s*,\s*({_NUM})\s*([\])])$")


def _whole(x: float) -> bool:
    return float(x).is_integer()


_UNIT = re.compile(r"^(.*?[\d+)\]])\s*([^\W\d_][\w/.\-]*|%)$")
_UNIT_NAMES = {
    **dict.fromkeys(("y", "yr", "yrs", "year", "years"), "year"),
    **dict.fromkeys(("mo", "mos", "month", "months"), "month"),
    **dict.fromkeys(("wk", "wks", "week", "weeks"), "week"),
    **dict.fromkeys(("d", "day", "days"), "day"),
}


def bin_unit(label: str) -> str:
    """The unit of time a bin label ends in (``45-64 years``: ``year``), its usual spellings one; "" for none
    or any other (``20-25 kg/m2``, ``45-64 yo``): bins in another unit of time are another scale, and an
    unknown unit is taken as the same scale as its variable's other bins, so that no spelling hides one."""
    s = label.strip()
    if _parse_interval(s) is not None:
        return ""
    m = _UNIT.match(s)
    if m is None:
        return ""
    return _UNIT_NAMES.get(m[2].casefold(), "")


def parse_bin(label: str) -> tuple[float, float] | None:
    """A bin label as a half-open interval ``[low, high)``; whole-number ranges are inclusive (``40-49`` is
    ``[40, 50)``, ``90+`` is ``[90, inf)``, ``(40, 50]`` of whole numbers is ``[41, 51)``); a unit after it
    is read apart (``45-64 years`` is ``[45, 65)``, unit :func:`bin_unit`). None if not a bin."""
    s = label.strip()
    if (b := _parse_interval(s)) is not None:
        return b
    if (m := _UNIT.match(s)) is not None:
        return _parse_interval(m[1].strip())
    return None


def _parse_interval(s: str) -> tuple[float, float] | None:
    if m := _RANGE.match(s):
        lo, hi = float(m[1]), float(m[2])
        if lo <= hi and _whole(lo) and _whole(hi):
            return lo, hi + 1
        return (lo, hi) if lo < hi else None
    if m := _OPEN_UP.match(s):
        if m[1] is not None:
            return float(m[1]), math.inf
        lo = float(m[3])
        return (lo + 1 if m[2] == ">" and _whole(lo) else lo), math.inf
    if m := _OPEN_DOWN.match(s):
        hi = float(m[2])
        return -math.inf, (hi + 1 if m[1] != "<" and _whole(hi) else hi)
    if m := _INTERVAL.match(s):
        lo, hi = float(m[2]), float(m[3])
        if m[1] == "(" and m[4] == "]" and _whole(lo) and _whole(hi):
            return lo + 1, hi + 1
        if m[1] == "[" and m[4] == ")":
            return lo, hi
    return None


def _binned(t: CountTable) -> dict[str, tuple[str, dict[Key, dict[tuple[float, float], float]]]]:
    """Variable whose categories are mostly bins -> (the bins' unit, rest of the key -> {bin: count}); its
    other categories (``unknown``, a missing value's group) are left out."""
    cats: dict[str, set[str]] = defaultdict(set)
    for k in t.facts:
        for v, c in k:
            cats[v].add(c)
    out: dict[str, tuple[str, dict[Key, dict[tuple[float, float], float]]]] = {}
    for var, labels in cats.items():
        parsed = {c: parse_bin(c) for c in labels if c.casefold() not in MISSING_LABELS}
        bins = {c: b for c, b in parsed.items() if b is not None}
        units = {bin_unit(c) for c in bins} - {""}  # a unit on some labels only ("1-4", "65+ years") is theirs
        if len(bins) < 2 or 2 * len(bins) <= len(parsed) or len(units) > 1:
            continue  # mostly not bins, or bins in more than one unit of time (months beside years)
        by_rest: dict[Key, dict[tuple[float, float], float]] = defaultdict(dict)
        for k, n in t.facts.items():
            label = next((c for v, c in k if v == var), None)
            if label is not None and label in bins:
                by_rest[k - {(var, label)}][bins[label]] = n
        out[var] = (next(iter(units), ""), by_rest)
    return out


def _cumulative(bins: Mapping[tuple[float, float], float]) -> dict[float, float] | None:
    """Boundary -> people below it, for bins that tile a range without gaps or overlaps."""
    ordered = sorted(bins.items())
    cum = {ordered[0][0][0]: 0.0}
    running = 0.0
    for i, ((lo, hi), n) in enumerate(ordered):
        if i and lo != ordered[i - 1][0][1]:
            return None
        running += n
        cum[hi] = running
    return cum


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("-inf" if x == -math.inf else (f"{int(x)}" if _whole(x) else f"{x:g}"))


def _bins(new: CountTable, rid: str, old: CountTable, sure: bool, min_count: int) -> list[Finding]:
    out = []
    old_binned = _binned(old)
    for var, (unit, new_rest) in _binned(new).items():
        for old_var, (old_unit, old_rest) in old_binned.items():
            if unit and old_unit and unit != old_unit:
                continue  # another scale: years beside months
            if var != old_var and var in new.domains and old_var in old.domains:
                continue  # two of the dataset's columns, each recomputed from its recipe: two quantities
            for rest, nb in new_rest.items():
                ob = old_rest.get(rest)
                if ob is None or set(nb) == set(ob):
                    continue
                if not math.isclose(sum(nb.values()), sum(ob.values()), abs_tol=1e-9):
                    continue  # not the same people
                cn, co = _cumulative(nb), _cumulative(ob)
                if cn is None or co is None:
                    continue
                # both tile everyone: what lies below the lower table's start is nobody in the other either
                points = dict(co)
                bottom = max(min(cn), min(co))
                consistent = True
                for x, c in cn.items():
                    if x in points and not math.isclose(points[x], c, abs_tol=1e-9):
                        consistent = False
                    points[x] = c
                if not consistent:
                    continue
                known = set(nb) | set(ob)
                xs = sorted(x for x in points if x >= bottom)
                for lo, hi in zip(xs, xs[1:], strict=False):
                    n = points[hi] - points[lo]
                    if (lo, hi) not in known and _small(n, min_count):
                        name = var if var == old_var else f"{var}/{old_var}"
                        cell = (*sorted(rest), (name, f"[{_fmt(lo)}, {_fmt(hi)})"))
                        out.append(Finding("bins", (rid,), cell, n, sure))
    return out


# ---------------------------------------------------------------------------------------------------


def _one_way(t: CountTable) -> list[CountTable]:
    """The table's counts by each of its variables alone, one table for each (of each of its groupings)."""
    return [
        CountTable(marginal(t, frozenset({v}), grouping), domains=t.domains)
        for grouping in _variable_sets(t)
        for v in grouping
    ]


def compare(new: CountTable, earlier: Sequence[tuple[str, CountTable]], min_count: int) -> list[Finding]:
    """Differences of ``new`` with itself and with each earlier release (``(request id, table)``) that count
    fewer than ``min_count`` people (and more than none)."""
    own = _pool([("", new)])
    found: list[Finding] = []
    if own is not None:
        found += _margins(own, {""}, True, min_count)  # one table: one population
    pooled_sure: list[tuple[str, CountTable]] = [("", new)]
    new_alone = _one_way(new)
    for rid, old in earlier:
        if not _comparable(new, old):
            continue
        same = _same_population(new, old)
        found += _nested(new, rid, old, min_count)
        # bins on each variable alone too: another variable beside one table's bins hides no piece
        for one in new_alone:
            for other in _one_way(old):
                found += _bins(one, rid, other, bool(same), min_count)
        if same is False:
            continue  # another version or a population not within the other: the bins above check both
        if same:
            pooled_sure.append((rid, old))
        else:  # unknown populations: each earlier table alone, as a suspicion
            pair = _pool([("", new), (rid, old)])
            if pair is not None:
                found += [f for f in _margins(pair, {""}, False, min_count) if f.earlier]
        found += _bins(new, rid, old, bool(same), min_count)
    if len(pooled_sure) > 1:
        pooled = _pool(pooled_sure)
        if pooled is not None:
            found += [f for f in _margins(pooled, {""}, True, min_count) if f.earlier]
    unique: dict[tuple[str, tuple[str, ...], tuple[Pair, ...]], Finding] = {}
    for f in found:
        unique.setdefault((f.kind, f.earlier, f.cell), f)
    return sorted(unique.values(), key=lambda f: (not f.sure, f.kind, f.earlier, f.cell))[:MAX_FINDINGS]


# ---------------------------------------------------------------------------------------------------
# Canonical forms


def _category(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(str(value).split())


def _categories(values: Sequence[Any]) -> list[str | None]:
    """Each value's category (:func:`_category`), None where missing; each distinct value is named once."""
    return once_per_value(
        values, lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else _category(v)
    )


def _values(df: Any, col: Any) -> list[Any]:
    """The values of the (first) column named ``col``."""
    return list(df.iloc[:, list(df.columns).index(col)].tolist())


def from_frame(df: Any, count_columns: Sequence[str], label_columns: Sequence[str]) -> CountTable:
    """The count facts of a submitted table without a recipe (population unknown): each row's labels are its
    cell's categories (a total label makes it a margin); several count columns make their headers the
    categories of :data:`COLUMNS_VARIABLE`. Read column by column (a row at a time through pandas costs
    seconds for a table of 100,000 rows)."""
    facts: dict[Key, float] = {}
    several = len(count_columns) > 1
    labels: list[list[Pair | None]] = []
    for col in label_columns:
        variable = _category(col)
        labels.append(
            [None if cat is None or is_total(cat) else (variable, cat) for cat in _categories(_values(df, col))]
        )
    counts: list[tuple[frozenset[Pair], list[Any]]] = []
    for col in count_columns:
        header = _category(col)
        extra = frozenset({(COLUMNS_VARIABLE, header)} if several and not is_total(header) else ())
        counts.append((extra, _values(df, col)))
    rows = zip(*labels, strict=True) if labels else ((),) * len(df)
    for i, row in enumerate(rows):
        pairs = frozenset(p for p in row if p is not None)
        for extra, values in counts:
            n = values[i]
            if n is None or (isinstance(n, float) and math.isnan(n)):
                continue
            facts.setdefault(pairs | extra, float(n))
    return CountTable(facts=facts)


def in_dataset_terms(t: CountTable, columns: Mapping[str, Iterable[str]]) -> CountTable:
    """A table read without its recipe, under the dataset's names: a header that is a column's name but for
    case, or whose labels are all categories of exactly one column, is that column, and each label is
    spelt as the catalogue spells it. Otherwise a header written ``AGE_BAND`` or ``band`` keys cells that no
    recipe's table shares, and nothing is compared."""
    folded = {name.casefold(): name for name in columns}
    spelt = {name: {_category(c).casefold(): _category(c) for c in cats} for name, cats in columns.items()}
    labels: dict[str, set[str]] = defaultdict(set)
    for k in t.facts:
        for v, c in k:
            labels[v].add(c)
    rename: dict[str, str] = {}
    for variable, cats in labels.items():
        # a wide table's count headers (F, M) are a variable too: matched by their labels alone
        name = None if variable == COLUMNS_VARIABLE else folded.get(variable.casefold())
        if name is None:
            fits = [n for n, known in spelt.items() if known and {c.casefold() for c in cats} <= set(known)]
            name = fits[0] if len(fits) == 1 else None
        if name is not None:
            rename[variable] = name

    def term(v: str, c: str) -> Pair:
        name = rename.get(v)
        return (name, spelt[name].get(c.casefold(), c)) if name is not None else (v, c)

    if not rename or len(set(rename.values())) != len(rename):
        return t
    facts = {frozenset(term(v, c) for v, c in k): n for k, n in t.facts.items()}
    return CountTable(facts=facts, dataset=t.dataset, version=t.version, population=t.population, domains=t.domains)


def from_counts(
    counts: Mapping[tuple[Any, ...], float],
    variables: Sequence[str],
    *,
    dataset: str,
    version: int | None,
    population: Mapping[str, tuple[str, ...]],
    domains: Mapping[str, tuple[str, ...]],
    members: str | None = None,
) -> CountTable:
    """The facts of a count table recomputed from its recipe: ``counts`` maps each cell's categories (in the
    order of ``variables``) to its count."""
    facts = {
        frozenset((var, _category(c)) for var, c in zip(variables, cats, strict=True)): float(n)
        for cats, n in counts.items()
    }
    return CountTable(
        facts=facts, dataset=dataset, version=version, population=population, domains=domains, members=members
    )


# ---------------------------------------------------------------------------------------------------
# The steward's side-by-side view

SIDE_ROWS = 200
"""Rows a side-by-side comparison shows at most: every flagged row, then the others in order."""


@dataclass(frozen=True)
class SideRow:
    cell: str
    """The cell's categories, ``variable = category`` joined by `` · ``; ``everyone`` for a grand total."""
    before: float | None
    """Its count in the earlier release(s); None where they do not count it."""
    now: float | None
    """Its count in the new table; None where it does not count it."""
    flagged: bool
    """The cell enters a difference that counts fewer than the minimum."""

    @property
    def difference(self) -> float | None:
        return None if self.before is None or self.now is None else self.now - self.before


@dataclass(frozen=True)
class SideBySide:
    """A new table beside the earlier release(s) that one group of findings differences it with."""

    earlier: tuple[str, ...]
    """The earlier requests (none: the findings lie within the new table)."""
    rows: tuple[SideRow, ...]
    hidden: int
    """Unflagged rows left out beyond :data:`SIDE_ROWS`."""
    findings: tuple[Finding, ...]


def cell_text(pairs: Iterable[Pair]) -> str:
    """A cell's categories as a steward reads them."""
    return " · ".join(f"{v} = {c}" for v, c in sorted(pairs)) or "everyone"


def _row_order(key: Key) -> tuple[int, list[tuple[str, int, float, float, str]]]:
    """Coarser cells first; within a variable, bins by their bounds, other categories by name."""
    parts = []
    for v, c in sorted(key):
        b = parse_bin(c)
        parts.append((v, 0, b[0], b[1], "") if b is not None else (v, 1, 0.0, 0.0, c))
    return len(key), parts


def _interval(label: str) -> tuple[float, float] | None:
    """``[lo, hi)`` as a bins finding writes it."""
    m = re.match(r"^\[(\S+), (\S+)\)$", label)
    if m is None:
        return None
    try:
        return float(m[1]), float(m[2])
    except ValueError:
        return None


def involved(finding: Finding, keys: Iterable[Key]) -> set[Key]:
    """Of ``keys``, the cells whose counts ``finding``'s difference is taken from: for ``nested`` the cell
    itself; for ``margin`` the total and its sub-cells of the variable left out; for ``bins`` every bin that
    overlaps the piece revealed."""
    keys = set(keys)
    if finding.kind == "nested":
        return keys & {frozenset(finding.cell)}
    if not finding.cell:
        return set()
    (var, label), rest = finding.cell[-1], frozenset(finding.cell[:-1])
    if finding.kind == "margin":
        finer = {k for k in keys if len(k) == len(rest) + 1 and rest < k and next(iter(k - rest))[0] == var}
        return finer | (keys & {rest})
    if finding.kind == "bins":
        piece = _interval(label)
        names = {var, *var.split("/")}
        out = set()
        for k in keys:
            if len(k) != len(rest) + 1 or not rest < k:
                continue
            v, c = next(iter(k - rest))
            b = parse_bin(c)
            if v in names and b is not None and piece is not None and b[0] < piece[1] and piece[0] < b[1]:
                out.add(k)
        return out
    return set()


def side_by_side(
    new: CountTable, earlier: Sequence[tuple[str, CountTable]], min_count: int, max_rows: int = SIDE_ROWS
) -> list[SideBySide]:
    """The findings of :func:`compare`, grouped by the earlier releases they are taken with, each group with
    the new table's cells beside theirs (pooled: one population counts a cell once) and the cells that enter
    a difference flagged."""
    findings = compare(new, earlier, min_count)
    tables = dict(earlier)
    groups: dict[tuple[str, ...], list[Finding]] = defaultdict(list)
    for f in findings:
        groups[f.earlier].append(f)
    out = []
    for rids, found in sorted(groups.items()):
        before: dict[Key, float] = {}
        for rid in rids:
            for k, n in tables[rid].facts.items():
                before.setdefault(k, n)
        keys = set(new.facts) | set(before)
        now = dict(new.facts)
        for f in found:  # a difference of sums over variables one table does not have: the sums, beside
            cell = frozenset(f.cell)
            if f.kind == "nested" and cell not in keys and len(f.earlier) == 1:
                variables = frozenset(v for v, _ in cell)
                now[cell] = marginal(new, variables).get(cell, 0.0)
                before[cell] = marginal(tables[f.earlier[0]], variables).get(cell, 0.0)
                keys.add(cell)
        flagged = set().union(*(involved(f, keys) for f in found))
        ordered = sorted(keys, key=_row_order)
        shown = [k for k in ordered if k in flagged]
        room = max(0, max_rows - len(shown))
        rest = [k for k in ordered if k not in flagged]
        chosen = set(shown) | set(rest[:room])
        rows = tuple(SideRow(cell_text(k), before.get(k), now.get(k), k in flagged) for k in ordered if k in chosen)
        out.append(SideBySide(rids, rows, max(0, len(rest) - room), tuple(found)))
    return out
