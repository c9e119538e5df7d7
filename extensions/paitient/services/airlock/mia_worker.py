"""Membership-inference audit, run inside the audit sandbox: ``python -I mia_worker.py job.json``.

Self-contained (torch, numpy, pandas, safetensors only): the sandbox holds the interpreter, this file,
``membership.py`` beside it (a copy of :mod:`paitient.rules.membership`, the attack statistics) and the job
directory, nothing of paitient. It loads the researcher's model definition, the weights and the rows,
computes each row's loss, and prints one JSON object with numbers only: the AUC of a loss-threshold attack
separating training rows (members) from held-out rows (non-members), and its advantage (the largest
TPR - FPR over thresholds).
"""

import importlib.util
import json
import os
import sys


def _statistics():
    """``membership.py`` from this file's folder (the interpreter runs isolated: no path of its own)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "membership.py")
    spec = importlib.util.spec_from_file_location("paitient_audit_membership", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(job):
    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    roc_auc_advantage = _statistics().roc_auc_advantage  # before the model's code runs
    torch.set_num_threads(1)
    torch.manual_seed(0)
    namespace = {"__name__": "paitient_audit_model"}
    with open(job["model_source"], encoding="utf-8") as f:
        code = compile(f.read(), "model.py", "exec")
    exec(code, namespace)  # noqa: S102 - the researcher's model definition, inside the sandbox
    cls = namespace.get(job["model_class"])
    if cls is None:
        return {"error": f"the model source defines no {job['model_class']!r}; name the class with model_class"}
    model = cls(**job.get("model_kwargs", {}))
    state = load_file(job["weights"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        return {"error": f"the weights do not fit the model: missing {list(missing)}, unexpected {list(unexpected)}"}
    model.eval()
    df = pd.read_parquet(job["data"])
    members = np.zeros(len(df), dtype=bool)
    members[job["members"]] = True
    x = df[job["features"]].to_numpy(dtype=np.float32)
    if job.get("preprocess") == "standardize":
        mu, sd = x[members].mean(axis=0), x[members].std(axis=0)
        x = (x - mu) / np.where(sd > 0, sd, 1.0)
    y = df[job["target"]].to_numpy()
    loss_name = job.get("loss", "cross_entropy")
    with torch.no_grad():
        out = model(torch.from_numpy(x))
        if loss_name == "cross_entropy":
            losses = torch.nn.functional.cross_entropy(out, torch.from_numpy(y.astype(np.int64)), reduction="none")
        elif loss_name == "bce":
            losses = torch.nn.functional.binary_cross_entropy_with_logits(
                out.reshape(-1), torch.from_numpy(y.astype(np.float32)), reduction="none"
            )
        elif loss_name == "mse":
            target = torch.from_numpy(y.astype(np.float32))
            losses = ((out.reshape(len(y), -1) - target.reshape(len(y), -1)) ** 2).mean(dim=1)
        else:
            return {"error": f"unknown loss {loss_name!r}; use cross_entropy, bce or mse"}
    losses = losses.numpy().astype(float)
    auc, advantage = roc_auc_advantage(-losses[members], -losses[~members])
    return {
        "auc": auc,
        "advantage": advantage,
        "members": int(members.sum()),
        "nonmembers": int((~members).sum()),
        "member_loss_mean": float(losses[members].mean()),
        "nonmember_loss_mean": float(losses[~members].mean()),
    }


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    try:
        answer = run(job)
    except Exception as e:  # report the researcher's model error as a number-free message
        answer = {"error": f"{type(e).__name__}: {e}"[:2000]}
    sys.stdout.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
