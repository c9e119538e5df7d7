"""A model as data: its ``torch.export`` graph, without a single parameter value.

The runner trains the graph with parameters it initialises itself, so nothing set in the notebook (values
written into weights, a state loaded from elsewhere) reaches training, and no code travels: only the JSON
of the exported program's operators and shapes (its ``exported_program`` part; the state dict, constants
and example inputs that ``torch.export.save`` would add are never sent). The batch dimension is exported
as dynamic, and the model in training mode, so that dropout is part of the graph; layers that work in
place (``ReLU(inplace=True)``) are exported as their out-of-place form, which computes the same.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

import torch


class ModelNotExportable(ValueError):
    """The model cannot be sent as a graph; the message says what to change."""


def export_graph(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The JSON of ``model``'s exported program for inputs shaped like ``example`` (any batch size)."""
    from torch._export.serde import serialize as ser

    if not isinstance(model, torch.nn.Module):
        raise ModelNotExportable(f"the model is a {type(model).__name__}; send a torch.nn.Module")
    if not isinstance(example, torch.Tensor):
        raise ModelNotExportable(f"the example is a {type(example).__name__}; give one tensor of rows")
    if example.dim() < 1 or example.shape[0] < 2:
        raise ModelNotExportable(
            "give an example batch of at least 2 rows as one tensor (e.g. torch.zeros(2, n_features)): "
            "the graph is exported for any batch size, and a batch of 1 would be taken for a fixed size"
        )
    printed, warned = io.StringIO(), io.StringIO()  # the exporter prints the partial graph when it fails
    with _exporting(model), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(warned):
        try:
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False
            )
        except Exception as e:  # the exporter's many ways to say no
            raise ModelNotExportable(_advice(e)) from None
    sys.stdout.write(printed.getvalue())  # what the model itself printed while it was traced
    sys.stderr.write(warned.getvalue())
    return bytes(ser.serialize(program).exported_program)


@contextlib.contextmanager
def _exporting(model: torch.nn.Module) -> Iterator[None]:
    """Training mode, in-place layers out of place and the exporter's own log lines quiet, for the export;
    the model as it was afterwards."""
    training = model.training
    in_place = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor")]
    levels = [log.level for log in loggers]
    model.train()
    for m in in_place:
        setattr(m, "inplace", False)  # noqa: B010 - any layer's flag, not one class's attribute
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        model.train(training)
        for m in in_place:
            setattr(m, "inplace", True)  # noqa: B010
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _advice(error: Exception) -> str:
    """What went wrong in the export, and what to change."""
    name = type(error).__name__
    first = (str(error).strip().splitlines() or [""])[0][:300]
    if "DataDependent" in name or "data-dependent" in str(error):
        what = (
            "the model branches on the values of a tensor (an `if`, a loop or .item() on data), which a graph "
            "cannot hold: compute both branches and combine them with arithmetic, or move the decision out of "
            "the model"
        )
    elif "Constraints violated" in first or ("batch" in first and "specializ" in str(error)):
        what = (
            "the model fixes the batch size (e.g. x.view(32, -1) or a size taken from the example); write sizes "
            "from the input: x.flatten(1), x.view(x.shape[0], -1), x.reshape(len(x), -1)"
        )
    elif "numpy" in first or "tensor subclass" in first:
        what = "the model leaves torch (numpy, Python lists) inside forward; keep forward to torch operations"
    else:
        what = (
            "check that the model runs on the example; use standard layers and no Python control flow that "
            "depends on the data"
        )
    return f"the model cannot be exported as a graph ({name}: {first}): {what}"
