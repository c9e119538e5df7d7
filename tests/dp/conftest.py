"""Fixtures for private training: the real ledger service on a socket, the breast-cancer data as loaders."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from tests.ledger.conftest import ledger, register, service, site, state_dir  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def cancer() -> TensorDataset:
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


@pytest.fixture
def loader(cancer) -> DataLoader:
    return DataLoader(cancer, batch_size=64, shuffle=True)


@pytest.fixture
def member(state_dir):  # noqa: F811 (the imported fixture)
    """The test process (root) registered as a researcher of oncology, so it may reserve."""
    return register(state_dir, "alice", 0, ("oncology",))


def mlp(hidden: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(30, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
