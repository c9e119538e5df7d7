"""What researchers print every day reveals (almost) no rows: the gate must let it through.

Each output is scanned against all three demo indexes at once, as the gate would for a member of both
projects. A handful of rows from head() is fine (a researcher may look at a few rows); aggregates,
logs, summaries, plots and random numbers reveal none, or one by chance at most.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest


def total(got: dict[str, int]) -> int:
    return sum(got.values())


def test_head_reveals_the_five_rows_it_shows(demo):
    df = demo.frames["breast_cancer"]
    with pd.option_context("display.max_columns", 20, "display.width", 250):  # as a notebook shows it
        assert list(demo.rows(repr(df.head()), "breast_cancer")) == [0, 1, 2, 3, 4]
        assert list(demo.rows(repr(df.drop(columns=["patient"]).head()), "breast_cancer")) == [0, 1, 2, 3, 4]
    assert list(demo.rows(df.drop(columns=["patient"]).head()._repr_html_(), "breast_cancer")) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("dataset", ["breast_cancer", "gbsg2", "diabetes"])
def test_aggregates_reveal_nothing(demo, dataset):
    df = demo.frames[dataset]
    num = df.select_dtypes("number")
    with pd.option_context("display.max_columns", None, "display.width", 250):
        outputs = {
            "value_counts()": repr(df["age"].value_counts()),
            "groupby mean": repr(num.groupby(df["age"], observed=True).mean()),
            "groupby mean and std": repr(num.groupby(df["postcode"], observed=True).agg(["mean", "std"])),
            "correlation matrix": repr(num.corr()),
            "covariance matrix": repr(num.cov()),
            "crosstab": repr(pd.crosstab(df["age"], df["postcode"])),
            "mean and std": repr(num.agg(["mean", "std", "sem"]).T),
        }
    for name, text in outputs.items():
        assert total(demo.revealed(text)) == 0, name


def _holds_extremes(df: pd.DataFrame, rows, stats: pd.DataFrame) -> dict[int, int]:
    """For each row, in how many columns its value is one of ``stats`` (printed to 6 decimals)."""
    out = {}
    for r in rows:
        hits = 0
        for c in stats.columns:
            printed = {round(float(v), 6) for v in stats[c]}
            hits += round(float(df[c].iloc[r]), 6) in printed
        out[int(r)] = hits
    return out


@pytest.mark.parametrize("dataset", ["breast_cancer", "gbsg2", "diabetes"])
def test_describe_reveals_only_rows_that_hold_three_of_its_extremes(demo, dataset):
    """describe()'s min, max and quartiles are values of real rows: one that holds three of them (the
    largest tumour: widest radius, perimeter and area) is shown by it, which is what disclosure rules
    say of minima and maxima. No other row, and few at all."""
    df = demo.frames[dataset]
    stats = df.describe()
    shown = stats.loc[["min", "25%", "50%", "75%", "max"]]
    with pd.option_context("display.max_columns", None, "display.width", 250):
        for text in (repr(stats), stats.to_json(), repr(stats.T)):
            rows = demo.rows(text, dataset)
            assert len(rows) <= 10
            assert all(n >= 3 for n in _holds_extremes(df, rows, shown).values())
            others = {k: v for k, v in demo.revealed(text).items() if k != dataset}
            assert sum(others.values()) == 0


def test_a_training_log_of_1000_epochs_reveals_at_most_one_row(demo):
    rng = np.random.default_rng(0)
    log = "\n".join(
        f"Epoch {i + 1}/1000 - loss: {0.69 * np.exp(-i / 300) + rng.normal(0, 0.01):.4f} - "
        f"acc: {0.5 + 0.45 * (1 - np.exp(-i / 200)):.4f} - val_loss: {0.7 * np.exp(-i / 280):.4f} - "
        f"val_acc: {0.5 + 0.44 * (1 - np.exp(-i / 210)) + rng.normal(0, 0.005):.4f} - lr: {1e-3 * 0.995**i:.6f}"
        for i in range(1000)
    )
    assert total(demo.revealed(log)) <= 1


def test_a_model_summary_reveals_nothing(demo):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(30, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 64),
        torch.nn.ReLU(), torch.nn.Linear(64, 2),
    )  # fmt: skip
    lines = [repr(model), f"{'Layer':<24}{'Shape':<20}{'Params':>10}"]
    for name, p in model.named_parameters():
        lines.append(f"{name:<24}{list(p.shape)!s:<20}{p.numel():>10,}")
    lines.append(f"Total params: {sum(p.numel() for p in model.parameters()):,}")
    lines.append(repr(model[0].weight[:4, :6]))  # a peek at the weights
    assert total(demo.revealed("\n".join(lines))) == 0


@pytest.mark.parametrize("n", [1000, 10_000])
def test_random_floats_reveal_nothing(demo, n):
    rng = np.random.default_rng(n)
    with np.printoptions(threshold=n + 1):
        outputs = [
            repr(rng.random(n)),
            repr(rng.normal(0, 1, (n // 10, 10))),
            "\n".join(str(v) for v in rng.normal(10, 5, n)),
            pd.DataFrame(rng.normal(size=(n // 5, 5))).to_csv(),
        ]
    for text in outputs:
        assert total(demo.revealed(text)) == 0


def test_plots_reveal_nothing(demo):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = demo.frames["breast_cancer"]
    fig, (a, b) = plt.subplots(1, 2)
    a.scatter(df["mean radius"], df["mean texture"], s=4)
    b.hist(df["worst area"], bins=30)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    plt.close(fig)
    assert total(demo.revealed(repr(fig) + svg.getvalue())) == 0


def test_integer_enumerations_reveal_at_most_a_few_rows(demo):
    outputs = [
        str(list(range(10_000))),
        str({i: float(i) for i in range(1000)}),
        str([float(i) for i in range(1000)]),
        repr(np.arange(0, 100, 0.1).round(1)),
        repr(demo.frames["breast_cancer"].index.tolist()),
    ]
    for text in outputs:
        assert total(demo.revealed(text)) <= 3
