"""The model's side of the membership-inference audit, run inside the audit sandbox:
``python -I mia_worker.py job.json``.

Self-contained (torch, numpy, safetensors only): the sandbox holds the interpreter, this file and the job
directory, nothing of paitient. It loads the researcher's model definition and the weights, runs the model
on the rows the airlock gave it (features only, already preprocessed, in an order the airlock shuffled: no
targets, no sign of which rows trained the model) and writes the outputs, nothing else, to ``out`` in one
binary frame:

    b"PAITIENT-OUTPUTS/1\\n" | rows (uint32 LE) | columns (uint32 LE) | rows x columns float32 LE

The airlock computes the losses, the attacks and every number it judges from these outputs itself. What
the process prints is never read as a result: a model whose code prints a fake verdict (at exit, say)
changes nothing, and one that writes a second frame makes the answer unreadable, not better.
"""

import json
import os
import struct
import sys

MAGIC = b"PAITIENT-OUTPUTS/1\n"
BATCH = 4096


def run(job):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    # Everything the frame needs is taken before the model's code runs.
    out = os.open(job["out"], os.O_WRONLY | os.O_TRUNC)  # the airlock's empty file, bound into the sandbox
    x = np.load(job["x"], allow_pickle=False).astype(np.float32, copy=False)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    namespace = {"__name__": "paitient_audit_model"}
    with open(job["model_source"], encoding="utf-8") as f:
        code = compile(f.read(), "model.py", "exec")
    exec(code, namespace)  # noqa: S102 - the researcher's model definition, inside the sandbox
    cls = namespace.get(job["model_class"])
    if cls is None:
        raise SystemExit(f"the model source defines no {job['model_class']!r}; name the class with model_class")
    model = cls(**job.get("model_kwargs", {}))
    missing, unexpected = model.load_state_dict(load_file(job["weights"]), strict=False)
    if missing or unexpected:
        raise SystemExit(f"the weights do not fit the model: missing {list(missing)}, unexpected {list(unexpected)}")
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            y = model(torch.from_numpy(x[start : start + BATCH]))
            parts.append(y.detach().to(torch.float32).reshape(len(y), -1).numpy())
    outputs = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros((0, 1), np.float32), dtype="<f4")
    frame = MAGIC + struct.pack("<II", outputs.shape[0], outputs.shape[1]) + outputs.tobytes()
    view = memoryview(frame)
    while view:
        view = view[os.write(out, view) :]
    os.close(out)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    run(job)


if __name__ == "__main__":
    main()
