"""What privacy costs in accuracy: breast-cancer classification at epsilon 1, 3, 8 beside non-private training.

One run: ``/opt/paitient/venv/bin/python benchmarks/bench_utility.py``. Two models (logistic regression
and a small MLP 30-16-2), five seeds, each seed its own stratified 80/20 split; delta 1e-5. Private runs
go through ``paitient.kernel.dp.make_private`` against a real ledger service in this process (a temporary
socket and state directory). Prints test accuracy, mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_dp import ledger_in_process  # noqa: E402

MODELS = {
    "logistic regression": lambda: nn.Linear(30, 2),
    "MLP 30-16-2": lambda: nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2)),
}


def split(seed: int):
    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(xtr)  # fitted on the training rows only

    def t(a, dtype):
        return torch.tensor(a, dtype=dtype)

    return (
        TensorDataset(t(scaler.transform(xtr), torch.float32), t(ytr, torch.long)),
        (t(scaler.transform(xte), torch.float32), t(yte, torch.long)),
    )


def accuracy(model: nn.Module, test) -> float:
    x, y = test
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, opt, loader, criterion, epochs: int) -> None:
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    from paitient import dp

    crit = nn.CrossEntropyLoss()
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="paitient-utility-") as tmp:
        site, server = ledger_in_process(Path(tmp))
        try:
            for seed in range(args.seeds):
                train_ds, test = split(seed)
                for name, make in MODELS.items():
                    torch.manual_seed(seed)
                    model = make()
                    train(
                        model,
                        torch.optim.SGD(model.parameters(), lr=0.1),
                        DataLoader(train_ds, batch_size=64, shuffle=True),
                        crit,
                        args.epochs,
                    )
                    results.setdefault((name, "non-private"), []).append(accuracy(model, test))
                    for eps in args.epsilons:
                        torch.manual_seed(seed)
                        model = make()
                        run = dp.make_private(
                            model,
                            torch.optim.SGD(model.parameters(), lr=1.0),
                            DataLoader(train_ds, batch_size=64),
                            target_epsilon=eps,
                            target_delta=1e-5,
                            epochs=args.epochs,
                            max_grad_norm=1.0,
                            project="bench",
                            dataset="synthetic",
                            criterion=crit,
                            run_dir=site.run_dir,
                            progress=False,
                            noise_generator=torch.Generator().manual_seed(seed),
                        )
                        train(run.model, run.optimizer, run.data_loader, crit, args.epochs)
                        assert run.finished and run.record["epsilon_spent"] <= eps
                        results.setdefault((name, f"eps={eps:g}"), []).append(accuracy(run.model, test))
                print(f"seed {seed} done", file=sys.stderr)
        finally:
            server.shutdown()
            server.server_close()

    columns = ["non-private", *(f"eps={e:g}" for e in args.epsilons)]
    print(
        f"breast cancer (569 rows, 30 features), test accuracy over {args.seeds} seeds, delta 1e-5, "
        f"{args.epochs} epochs, batch 64, clip 1.0, PRV accountant"
    )
    print(f"{'model':<22}" + "".join(f"{c:>16}" for c in columns))
    for name in MODELS:
        cells = []
        for c in columns:
            v = results[(name, c)]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}")
        print(f"{name:<22}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
