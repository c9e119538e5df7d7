"""The automatic checks for one request, by kind. Each returns a list of check results with reasons.

- ``table``: :mod:`paitient.rules.disclosure` (minimum count, zeros; dominance and p-ratio through ACRO when
  the request carries the table's recipe).
- ``weights``: :mod:`paitient.services.airlock.weights` (safetensors only, a matching DP training record within the
  budget) and the membership-inference audit (:mod:`paitient.services.airlock.mia`).
- ``figure``: the file must decode as a PNG, JPEG or GIF image (:mod:`paitient.services.airlock.images`); what it
  carries beyond its pixels (metadata, trailing bytes, more frames) is named for the reviewer, who sees the
  pixels only. No automatic disclosure check exists: a steward reviews every figure by hand.
- ``other``: no automatic disclosure check exists, so a steward reviews it by hand; a table is still checked
  not to be row-level data, and a table or text not to hold patient rows (``row_content``).

Every kind is also checked not to be a copy of a published dataset file, and tables not to be row-level
data (:mod:`paitient.services.airlock.published`).

Tables are checked as the researcher wrote their cells: the single quote the canonical CSV puts in front of
text a spreadsheet would run as a formula is taken off first (:mod:`paitient.rules.formulas`).

Tables are also checked by their content, whatever their columns are called:

- ``labels``: every text cell and header is a category the catalogue lists for one of the project's datasets,
  a column name, a label of the project's ``table_labels``, or a number written as text
  (:func:`paitient.rules.disclosure.check_labels`);
- ``row_content``: the table, rendered as CSV from its parsed values, reveals no row of the project's datasets
  to the egress gate's exact-data-match index (pseudonyms, or three distinctive values of one row together);
- ``differencing``: a count table, with the project's earlier releases, reveals no group smaller than the
  minimum count (:mod:`paitient.rules.differencing`). The table's canonical form is kept with the request; it
  counts as released when the request is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from paitient.rules import differencing, disclosure, formulas, review, split
from paitient.rules.disclosure import result
from paitient.services.airlock import canonical, images, mia, published, weights
from paitient.services.airlock.store import Request

log = logging.getLogger("paitient.services.airlock")

IMAGE_TYPES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}


NO_DATASETS = "the checks were given no way to read the published datasets, so they cannot"


def image_type(data: bytes) -> str | None:
    """The MIME type of a PNG, JPEG or GIF by its magic bytes; anything else is not previewed as an image."""
    for magic, mime in IMAGE_TYPES.items():
        if data.startswith(magic):
            return mime
    return None


@dataclass
class CheckContext:
    """What the checks need from the site, passed in so each part can be tested alone."""

    rules: disclosure.TableRules = field(default_factory=disclosure.TableRules)
    lookup_run: Callable[[str], dict[str, Any] | None] | None = None
    """``sha256 -> ledger run or None`` (the privacy ledger's ``record_by_hash``)."""
    budget_for: Callable[[str, str], Any] | None = None
    """``(project, dataset) -> Budget``."""
    load_dataset: Callable[[str, str, Any], pd.DataFrame] | None = None
    """``(project, dataset, version or None) -> DataFrame`` of the published dataset."""
    published: Callable[[], list[published.Published]] | None = None
    """The published dataset files (for the published-copy and row-level checks)."""
    mia_max_auc: float = 0.6
    mia_max_advantage: float = 0.2
    audit_account: str = ""
    """The audit's dedicated account; ``prepare_audit_account`` (when given) makes it and returns its name."""
    prepare_audit_account: Callable[[], str] | None = None
    audit_timeout: float = 600.0
    audit_memory_mb: int = 4096
    audit_work_root: str | None = None
    """Where the audits' scratch folders go (see :func:`paitient.services.airlock.mia.prepare_work_root`)."""
    jobs_public_key: Callable[[], Any] | None = None
    """The training runner's published public key (Ed25519), for certified weights."""
    self_reported_policy: Callable[[str], tuple[str, str]] | None = None
    """``project -> (self_reported_weights, self_reported_reason)`` of the project's settings."""
    labels: Callable[[str], disclosure.Labels] | None = None
    """``project -> Labels``: the catalogued categories and column names of its datasets and its table_labels."""
    reveal: Callable[[str, bytes], dict[str, int]] | None = None
    """``(project, text) -> {"project/dataset": rows revealed}`` by the exact-data-match indexes; raises
    LookupError when a dataset's index is missing."""
    stage_table: Callable[[str, str, differencing.CountTable], None] | None = None
    """``(request id, project, table)``: keep a request's canonical count table (released with the request)."""
    earlier_tables: Callable[[str, str], list[tuple[str, differencing.CountTable, bool]]] | None = None
    """``(project, request id) -> [(earlier request id, table, released)]``: the project's count tables released
    or in review, but the request's own."""
    catalogue_columns: Callable[[str], dict[str, frozenset[str]]] | None = None
    """``project -> {column: its catalogued categories}`` of the project's datasets: a table without a recipe
    is compared under the dataset's names for its headers and labels."""
    current_version: Callable[[str, str], int | None] | None = None
    """``(project, dataset) -> the version `current` points to, or None``: a recipe that names no version is
    checked, compared and released as that version."""
    membership_audit: bool = True
    """Run the membership-inference audit of self-reported weights; False for a check before a request
    (:mod:`paitient.services.airlock.feedback`), whose answer then says the audit runs on the request."""


def load_published(data_root: Path, project: str, dataset: str, version: Any = None) -> pd.DataFrame:
    """Read ``<data_root>/<project>/<dataset>/versions/<N>/data.parquet`` (``current`` without a version)."""
    dataset = dataset.split("/")[-1]
    base = Path(data_root) / project / dataset
    where = base / "versions" / str(int(version)) if version not in (None, "") else base / "current"
    path = where / "data.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"no published dataset {project}/{dataset}"
            + (f" version {version}" if version not in (None, "") else "")
            + f" at {path}"
        )
    return pd.read_parquet(path)


def run_checks(req: Request, data: bytes, ctx: CheckContext) -> list[dict[str, Any]]:
    files = ctx.published() if ctx.published else []
    copy = published.check_not_published(req.sha256, files)
    if req.kind == "table":
        return [copy, *check_table(req, data, ctx, files)]
    if req.kind == "weights":
        return [copy, *check_weights(req, data, ctx)]
    what = "figures" if req.kind == "figure" else "outputs of this kind"
    details = {"image": image_type(data)} if req.kind == "figure" else {}
    out = [
        copy,
        result(
            "manual_review",
            "review",
            f"there is no automatic disclosure check for {what}: a steward reviews it by hand",
            **details,
        ),
    ]
    return [*out, check_image(data)] if req.kind == "figure" else [*out, *check_other(req, data, ctx, files)]


def check_other(
    req: Request, data: bytes, ctx: CheckContext, files: Sequence[published.Published] = ()
) -> list[dict[str, Any]]:
    """An output of kind ``other``, by the form the airlock stored it in: a table is checked not to be row-level
    data and not to hold patient rows, a text not to hold patient rows, all of it (the steward reads a text
    whole, :data:`paitient.services.airlock.canonical.TEXT_MAX_CHARS`; a table's preview shows its first
    rows)."""
    form = (req.meta.get("canonical") or {}).get("form")
    if form == "csv":
        try:
            df = canonical.read_frame(data, req.filename)
        except disclosure.TableError as e:
            return [result("readable", "fail", str(e))]
        df = formulas.restore_frame(df)
        return [published.check_row_level(df, list(files)), check_row_content(req.project, df, ctx)]
    if form == "text":
        return [check_text_rows(req.project, data, ctx, "the text")]
    return []


def check_image(data: bytes) -> dict[str, Any]:
    """Does the figure decode as an image, and what does it carry beyond its pixels?"""
    hint = "save figures as PNG, e.g. plt.savefig('figure.png')"
    if len(data) > canonical.PREVIEW_MAX_SOURCE_BYTES:
        return result(
            "image",
            "fail",
            f"the file has {len(data)} bytes, more than a figure may ({canonical.PREVIEW_MAX_SOURCE_BYTES})",
        )
    try:
        im = images.reencode(data, max_pixels=canonical.PREVIEW_MAX_PIXELS, max_bytes=canonical.PREVIEW_MAX_IMAGE_BYTES)
    except images.ImageRefused as e:
        return result("image", "fail", f"the file is not a figure the airlock can show: {e}; {hint}")
    what = f"a {im.format} image of {im.width}x{im.height} pixels"
    sizes = {"width": im.width, "height": im.height, "frames": im.frames}
    if im.beyond_pixels:
        return result(
            "image",
            "review",
            f"{what} that also carries {'; '.join(im.beyond_pixels)}: reviewers see its pixels only, and the "
            "file released is the upload as it is",
            **sizes,
            beyond_pixels=list(im.beyond_pixels),
        )
    return result("image", "pass", f"{what} with nothing beyond its pixels", **sizes)


def check_table(
    req: Request, data: bytes, ctx: CheckContext, files: Sequence[published.Published] = ()
) -> list[dict[str, Any]]:
    try:
        df = canonical.read_frame(data, req.filename)
    except disclosure.TableError as e:
        return [result("readable", "fail", str(e))]
    df = formulas.restore_frame(df)  # the cells as the researcher wrote them, without the CSV's formula quotes
    content = [published.check_row_level(df, list(files)), check_labels(req.project, df, ctx)]
    content.append(check_row_content(req.project, df, ctx))
    recipe = req.meta.get("recipe")
    alone = from_frame(df)
    if alone is not None and ctx.catalogue_columns is not None:
        alone = differencing.in_dataset_terms(alone, ctx.catalogue_columns(req.project))
    if not recipe:
        return [*content, *disclosure.check_table_alone(df, ctx.rules), check_differencing(req, alone, ctx)]
    if ctx.load_dataset is None:
        unchecked = result("recipe", "error", f"{NO_DATASETS} check the recipe; a steward checks it by hand")
        return [*content, unchecked, *disclosure.check_table_alone(df, ctx.rules), check_differencing(req, alone, ctx)]
    try:
        recipe = disclosure.validate_recipe(recipe)
        if recipe.get("version") in (None, "") and ctx.current_version is not None:
            # pinned: the differencing compares versions, and the table released is this version's
            pinned = ctx.current_version(req.project, recipe["dataset"])
            recipe = recipe if pinned is None else {**recipe, "version": pinned}
        source = ctx.load_dataset(req.project, recipe["dataset"], recipe.get("version"))
    except (disclosure.TableError, FileNotFoundError, KeyError) as e:
        failed = result("recipe", "fail", str(e))
        return [*content, failed, *disclosure.check_table_alone(df, ctx.rules), check_differencing(req, alone, ctx)]
    out = [*content, *disclosure.check_with_recipe(df, source, recipe, ctx.rules)]
    matched = next((r for r in out if r["check"] == "recipe" and r["status"] == "pass"), None)
    if matched is not None:
        why = disclosure.unseen_release_refusal(recipe)
        matched["details"]["automatic"] = why or True
        matched["details"]["version"] = recipe.get("version")
    table = recipe_counts(source, recipe) if matched and recipe["aggfunc"] == "count" else alone
    return [*out, check_differencing(req, table, ctx)]


def computed_table(source: pd.DataFrame, recipe: dict[str, Any]) -> pd.DataFrame:
    """The table a (validated) count recipe makes, as the airlock releases it without a steward: one row per
    cell that counts anyone, its variables' values (from the dataset) and the count. Nothing in it is the
    kernel's: not a label, not a number, not a column name but the recipe's variables."""
    recipe = disclosure.validate_recipe(recipe)
    variables = [*recipe["index"], *recipe["columns"]]
    rows = disclosure.recipe_rows(source, recipe)
    name = "n" if "n" not in variables else "count"
    return rows.groupby(variables, dropna=False, observed=True).size().rename(name).reset_index()


ROW_CONTENT_LIMIT = 0
"""Rows of a dataset a table may reveal: none. A row counts only when one of its pseudonyms, or three of its
distinctive values together, appear in one line of the table, which an aggregate does not do by chance; and a
released table leaves for good."""


def check_labels(project: str, df: pd.DataFrame, ctx: CheckContext) -> dict[str, Any]:
    if ctx.labels is None:
        return result(
            "labels", "error", "the checks were given no catalogue, so they cannot check the labels; a steward does"
        )
    return disclosure.check_labels(df, ctx.labels(project))


def check_row_content(project: str, df: pd.DataFrame, ctx: CheckContext) -> dict[str, Any]:
    """Rows of the project's datasets the table reveals by its content, found with the egress gate's index."""
    return check_text_rows(project, disclosure.table_text(df), ctx, "the table")


def check_text_rows(project: str, text: bytes, ctx: CheckContext, what: str) -> dict[str, Any]:
    """Rows of the project's datasets ``text`` reveals, found with the egress gate's index (``what`` names it)."""
    if ctx.reveal is None:
        return result("row_content", "error", "the checks were given no row index; a steward checks for patient rows")
    try:
        found = {k: int(n) for k, n in ctx.reveal(project, text).items() if n}
    except LookupError as e:
        return result("row_content", "error", f"the rows cannot be looked up ({e}); a steward checks by hand")
    total = sum(found.values())
    if total > ROW_CONTENT_LIMIT:
        named = ", ".join(f"{n} of {k}" for k, n in sorted(found.items()))
        return result(
            "row_content",
            "fail",
            f"{what} holds patient rows ({named}): pseudonyms or values of one patient's row together, found "
            "by content whatever the columns are called; row-level data never leaves, export an aggregate",
            rows=found,
            limit=ROW_CONTENT_LIMIT,
        )
    return result("row_content", "pass", f"{what} reveals no row of the project's datasets", limit=ROW_CONTENT_LIMIT)


def from_frame(df: pd.DataFrame) -> differencing.CountTable | None:
    """The count facts of a table read without its recipe; None when it holds no counts."""
    df = disclosure.with_index(df)
    counted = {str(c) for c in disclosure.count_columns(df)}
    counts = [c for c in df.columns if str(c) in counted]
    if not counts:
        return None
    labels = [c for c in disclosure.text_columns(df) if not pd.api.types.is_bool_dtype(df[c])]
    return differencing.from_frame(df, counts, labels)


def recipe_counts(data: pd.DataFrame, recipe: dict[str, Any]) -> differencing.CountTable:
    """The count table a (validated, matching) recipe makes, with its population and the variables' domains."""
    variables = [*recipe["index"], *recipe["columns"]]
    rows = disclosure.recipe_rows(data, recipe)
    counts = rows.groupby(variables, dropna=False, observed=True).size()
    cells = {(k if isinstance(k, tuple) else (k,)): float(n) for k, n in counts.items()}
    version = recipe.get("version")
    return differencing.from_counts(
        cells,
        variables,
        dataset=str(recipe["dataset"]).split("/")[-1],
        version=int(version) if version not in (None, "") else None,
        population=disclosure.population(data, recipe.get("filter") or {}),
        domains={v: tuple(sorted({differencing._category(x) for x in data[v].dropna().unique()})) for v in variables},
        members=differencing.members_of(disclosure.filter_mask(data, recipe.get("filter") or {})),
    )


def check_differencing(req: Request, table: differencing.CountTable | None, ctx: CheckContext) -> dict[str, Any]:
    """The table against itself and the project's earlier count tables: no difference may count a small group."""
    if table is None:
        return result("differencing", "pass", "not a count table: differences between releases apply to counts")
    if ctx.stage_table is None or ctx.earlier_tables is None:
        return result("differencing", "error", "the checks were given no record of earlier releases; a steward checks")
    ctx.stage_table(req.id, req.project, table)
    earlier = ctx.earlier_tables(req.project, req.id)
    released = {rid for rid, _, done in earlier if done}
    findings = differencing.compare(table, [(rid, t) for rid, t, _ in earlier], ctx.rules.min_count)
    if not findings:
        return result(
            "differencing",
            "pass",
            f"no difference with itself or the project's {len(earlier)} earlier count table(s) counts fewer than "
            f"{ctx.rules.min_count} people",
            compared=len(earlier),
        )
    fail = [f for f in findings if f.sure and set(f.earlier) <= released]
    status = "fail" if fail else "review"
    first = (fail or findings)[0]
    pending = sorted({rid for f in findings for rid in f.earlier} - released)
    return result(
        "differencing",
        status,
        f"{len(findings)} difference(s) count fewer than {ctx.rules.min_count} people: {first.describe()} "
        "(the cells are in the check's details)"
        + (f"; requests {', '.join(pending)} are still in review" if pending else "")
        + (
            ""
            if fail
            else "; a population is not known from a recipe, or the tables are of two versions, so a steward judges"
        )
        + "; merge categories, drop the filter or the table, or release the same cells as before",
        findings=[f.to_json() for f in findings],
        earlier=sorted({rid for f in findings for rid in f.earlier}),
        compared=len(earlier),
    )


def check_weights(req: Request, data: bytes, ctx: CheckContext) -> list[dict[str, Any]]:
    fmt, tensors = weights.check_format(data)
    if tensors is None:
        return [fmt]
    if req.meta.get("job"):
        return [fmt, *check_certified(req, data, ctx)]
    return [fmt, *_self_reported(req, data, ctx)]


SELF_REPORTED = (
    "self-reported, not certified: these weights were trained in the kernel, whose DP record the researcher's own "
    "code reported; train with paitient.jobs.submit for weights the runner certifies"
)


def check_certified(req: Request, data: bytes, ctx: CheckContext) -> list[dict[str, Any]]:
    """Weights from a training job: the runner's signature over the record, the weights' hash, the ledger's
    settlement of the job and the project's thresholds must all agree. Nothing here comes from a kernel."""
    from paitient.rules import training_record

    envelope = req.meta.get("record")
    try:
        if ctx.jobs_public_key is None:
            raise training_record.RecordInvalid("the runner's public key is not configured")
        record = training_record.verify(envelope, ctx.jobs_public_key(), data)
    except (training_record.RecordInvalid, OSError) as e:
        return [result("certified", "fail", f"the training record does not hold: {e}")]
    key_id = str(envelope["key_id"]) if isinstance(envelope, dict) else ""  # verify() accepted a mapping
    out = [
        result(
            "certified",
            "pass",
            f"signed by the training runner (job {record['job_id']})",
            record=record,
            key_id=key_id,
        )
    ]
    if record["project"] != req.project or record["job_id"] != req.meta.get("job"):
        return [result("certified", "fail", "the record is another project's or another job's")]
    run = None
    try:
        if ctx.lookup_run is None or ctx.budget_for is None:
            raise RuntimeError("the privacy ledger is not configured")
        run = ctx.lookup_run(req.sha256)
        budget_for = ctx.budget_for
        ledger = weights.check_training_record(
            run, project=req.project, budget_for=lambda ds: budget_for(req.project, ds)
        )
    except Exception as e:
        log.exception("ledger lookup for %s failed", req.id)
        ledger = result("training_record", "error", f"the privacy ledger could not be asked ({e}); a steward checks")
    if ledger["status"] == "pass" and run is not None:
        settled = run.get("epsilon_spent")
        if (
            run.get("run_id") != f"job:{record['job_id']}"
            or not isinstance(settled, int | float)
            or (abs(float(settled) - float(record["epsilon"])) > 1e-9)
        ):
            ledger = result("training_record", "fail", "the ledger's settlement of the job does not match its record")
    out.append(ledger)
    out.append(_runner_audit(record["metrics"], ctx.mia_max_auc - 0.5))
    return out


def _runner_audit(metrics: dict[str, float], allowed: float) -> dict[str, Any]:
    """Judge the runner's membership-inference numbers (:func:`paitient.services.airlock.mia.judge_gap`)."""
    status, reason = mia.judge_gap(metrics, allowed, "the runner's audit on its held-out rows")
    return result("membership_inference", status, reason, **{k: v for k, v in metrics.items() if k.startswith("mia_")})


def _policy(project: str, ctx: CheckContext) -> dict[str, Any]:
    """The project's policy on self-reported weights, as a check: refused, or two approvals and its reason."""
    policy, reason = (
        ctx.self_reported_policy(project) if ctx.self_reported_policy else (review.REFUSE_SELF_REPORTED, "")
    )
    if policy != review.TWO_PERSON:
        return result("policy", "fail", review.self_reported_refusal(project))
    return result(
        "policy",
        "review",
        f"project {project} releases self-reported weights only after two independent steward approvals; "
        f"the project's reason: {reason}",
        approvals_needed=2,
    )


def _self_reported(req: Request, data: bytes, ctx: CheckContext) -> list[dict[str, Any]]:
    out = [result("certified", "review", SELF_REPORTED), _policy(req.project, ctx)]
    canonical = weights.canonical_sha256(data)
    run = None
    try:
        lookup_run, budget_for = ctx.lookup_run, ctx.budget_for
        if lookup_run is None or budget_for is None:
            raise RuntimeError("the privacy ledger is not configured")
        run = lookup_run(canonical) or lookup_run(req.sha256)
        out.append(
            weights.check_training_record(run, project=req.project, budget_for=lambda ds: budget_for(req.project, ds))
        )
    except Exception as e:
        log.exception("ledger lookup for %s failed", req.id)
        out.append(
            result(
                "training_record",
                "error",
                f"the privacy ledger could not be asked ({e}); a steward checks the training record by hand",
            )
        )
    out[-1]["details"]["canonical_sha256"] = canonical
    out.append(_membership_audit(req, data, run, ctx))
    return out


def _membership_audit(req: Request, data: bytes, run: dict[str, Any] | None, ctx: CheckContext) -> dict[str, Any]:
    model = req.meta.get("model") or {}
    if not model.get("source"):
        return result(
            "membership_inference",
            "fail",
            "no model definition came with the weights, so the membership-inference audit cannot run; "
            "request again with model_source= (the Python source of the model class)",
        )
    if run is not None and run.get("project") == req.project:
        dataset = str(run.get("dataset", ""))
        version = (run.get("record") or {}).get("dataset_version")
    else:
        dataset, version = str(model.get("dataset", "")), model.get("dataset_version")
    if not dataset:
        return result(
            "membership_inference",
            "fail",
            "the audit needs the training dataset: no training record names it and the request gives none",
        )
    if ctx.load_dataset is None:
        return result("membership_inference", "error", f"{NO_DATASETS} run the audit; a steward checks by hand")
    try:
        frame = ctx.load_dataset(req.project, dataset, version)
        members = split.members_from_spec(model.get("split"), len(frame))
        target = model.get("target")
        if not isinstance(target, str) or target not in frame:
            raise KeyError(f"the dataset has no target column {target!r}; name it with target=")
        features = model.get("features") or [c for c in frame.columns if c != target]
        absent = [c for c in features if c not in frame]
        if absent:
            raise KeyError(f"the dataset has no feature column(s) {absent}")
        job = mia.AuditJob(
            model_source=model["source"],
            weights=data,
            data=frame,
            members=[int(i) for i in members.nonzero()[0]],
            features=list(features),
            target=target,
            loss=model.get("loss", "cross_entropy"),
            model_class=model.get("class", "Model"),
            model_kwargs=model.get("kwargs") or {},
            preprocess=model.get("preprocess", "none"),
        )
    except (split.SplitError, KeyError, FileNotFoundError, ValueError) as e:
        return result("membership_inference", "fail", f"the audit cannot run: {e}")
    if not ctx.membership_audit:
        return result(
            "membership_inference",
            "review",
            "not run in a check before the request: the audit runs the model over the dataset in its sandbox for "
            "up to several minutes, so it runs when the request is filed",
            skipped=True,
        )
    limits = mia.Limits(
        memory_mb=ctx.audit_memory_mb, max_processes=64, max_open_files=256, cpu_seconds=int(ctx.audit_timeout) + 1
    )
    try:
        account = ctx.prepare_audit_account() if ctx.prepare_audit_account else ctx.audit_account
        if not account:
            raise ValueError("no account is set for the audit ([airlock] audit_account)")
        answer = mia.run_audit(
            job, account=account, timeout=ctx.audit_timeout, limits=limits, work_root=ctx.audit_work_root
        )
    except (ValueError, KeyError, RuntimeError) as e:
        return result("membership_inference", "fail", f"the audit cannot run: {e}")
    return mia.judge(answer, max_auc=ctx.mia_max_auc, max_advantage=ctx.mia_max_advantage)
