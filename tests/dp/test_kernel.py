"""In a real IPython kernel the progress bar is tqdm's notebook widget, with the epsilon spent so far."""

import json
import re

import pytest
from jupyter_client.manager import start_new_kernel

CODE = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from paitient import dp
x, y = load_breast_cancer(return_X_y=True)
ds = TensorDataset(torch.tensor(StandardScaler().fit_transform(x), dtype=torch.float32), torch.tensor(y))
model = nn.Linear(30, 2)
run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=64),
                      target_epsilon=1.0, epochs=2, max_grad_norm=1.0, project="oncology",
                      dataset="breast_cancer", criterion=nn.CrossEntropyLoss())
for epoch in range(run.epochs):
    for xb, yb in run.data_loader:
        run.optimizer.zero_grad()
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
print("SETTLED", run.record["epsilon_spent"])
"""


@pytest.mark.timeout(180)
def test_progress_is_a_widget_with_epsilon(service, site, member):
    km, kc = start_new_kernel(
        kernel_name="python3", env={"PAITIENT_RUN_DIR": str(site.run_dir), "PATH": "/usr/bin:/bin"}
    )
    try:
        msgs = []
        reply = kc.execute_interactive(CODE, timeout=150, output_hook=msgs.append)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    views = [
        m
        for m in msgs
        if m["msg_type"] == "display_data" and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
    ]
    assert views, [m["msg_type"] for m in msgs]
    text = json.dumps([m["content"] for m in msgs]).replace("\\u2007", " ")  # tqdm's figure spaces
    assert "private training (fast) on oncology/breast_cancer" in text
    assert "epsilon 0 of 1]" in text  # the bar's postfix at the start, after each epoch, and at the end
    assert re.search(r"epsilon 0\.\d+ of 1]", text) and re.search(r"epsilon 0\.\d+ of 1, settled", text)
    stdout = "".join(
        m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )
    assert "paitient.kernel.dp: mode fast" in stdout and "SETTLED" in stdout
    settled = float(stdout.split("SETTLED")[1].split()[0])
    assert service.ledger.runs("oncology")[0]["epsilon_spent"] == settled
