"""One job's training, inside the sandbox: ``python -m paitient.services.jobs.worker job.json``.

Reads the graph, the arrays and the plan the runner wrote into its job folder, initialises the parameters
with the runner's scheme and seed, or takes the checkpoint's values the runner wrote there (no value comes
from the researcher), trains under DP, evaluates on the
held-out rows and runs the membership-inference audit there, writes ``weights.safetensors`` into its
output folder, and prints JSON lines: ``{"step", "steps", "epsilon", "loss"}`` as it trains, then
``{"done": true, "steps", "metrics": {...}}``. It runs no researcher code: the graph is data, checked
against the operator allow-list before it is loaded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

REPORT_SECONDS = 0.5


def main(job_file: str) -> int:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from paitient.services.jobs.graph import initialise, load_graph
    from paitient.services.jobs.train import (
        Plan,
        TrainSpec,
        audited_ways,
        evaluate,
        train,
        worst_membership_audit,
    )

    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(2)
    graph = load_graph(Path(job["graph"]).read_bytes())
    if "weights" in job["init"]:  # a checkpoint the runner loaded, checked and wrote as float32
        from safetensors.torch import load_file

        params = {name: t.to(graph.params[name][1]) for name, t in load_file(job["init"]["weights"]).items()}
        if {k: tuple(t.shape) for k, t in params.items()} != {k: s for k, (s, _) in graph.params.items()}:
            raise SystemExit("the initial parameters do not fit the graph")
    else:
        params = initialise(graph, job["init"]["scheme"], int(job["init"]["seed"]))
    arrays = np.load(job["arrays"], allow_pickle=False)
    spec = TrainSpec(**job["spec"])
    module, eval_module = graph.module, graph.eval_module

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(module, p, (x,))
        return out

    def evaluated(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:  # dropout off
        out: torch.Tensor = torch.func.functional_call(eval_module, p, (x,))
        return out

    x_train, y_train = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    x_hold, y_hold = torch.from_numpy(arrays["x_holdout"]), torch.from_numpy(arrays["y_holdout"])
    last = [0.0]

    def on_step(progress: Any) -> bool:
        now = time.monotonic()
        if now - last[0] >= REPORT_SECONDS or progress.step == progress.steps:
            last[0] = now
            _say({"step": progress.step, "steps": progress.steps, "epsilon": progress.epsilon, "loss": progress.loss})
        return True

    result = train(
        forward,
        params,
        x_train,
        y_train,
        spec,
        on_step=on_step,
        the_plan=Plan(**job["plan"]),
        device=job.get("device", "auto"),
        # the fast way's norms are each row's only where no row's output reads another row
        clipping="auto" if graph.rows_independent else "exact",
    )
    dropout = any(op.endswith("dropout.default") for op in graph.ops)
    tested, ways = audited_ways(evaluated, forward, dropout=dropout, rows_independent=graph.rows_independent)
    metrics = {f"test_{k}": v for k, v in evaluate(tested, result.params, x_hold, y_hold, spec.loss).items()}
    metrics.update(
        worst_membership_audit(ways, result.params, x_train, y_train, x_hold, y_hold, spec.loss, seed=spec.seed)
    )
    save_file(
        {k: v.detach().contiguous() for k, v in result.params.items()}, str(Path(job["out"]) / "weights.safetensors")
    )
    _say(
        {
            "done": True,
            "steps": result.steps,
            "metrics": _numbers(metrics),
            "device": result.device,
            "clipping": result.clipping,
            "graph": result.graph,
        }
    )
    return 0


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, list | tuple) and len(value) == 2:  # an interval: its two ends
            out[f"{key}_low"], out[f"{key}_high"] = float(value[0]), float(value[1])
    return out


def _say(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
