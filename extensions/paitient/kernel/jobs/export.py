"""A model as data: its ``torch.export`` graph, without a single parameter value.

The runner trains the graph with parameters it initialises itself, so nothing set in the notebook (values
written into weights, a state loaded from elsewhere) reaches training, and no code travels: only the JSON
of the exported program's operators and shapes. The batch dimension is exported as dynamic.
"""

from __future__ import annotations

import torch


class ModelNotExportable(ValueError):
    """The model cannot be sent as a graph; the message says what to change."""


def export_graph(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The JSON of ``model``'s exported program for inputs shaped like ``example`` (any batch size)."""
    from torch._export.serde import serialize as ser

    if example.dim() < 1 or example.shape[0] < 2:
        raise ModelNotExportable("give an example batch of at least 2 rows (e.g. torch.zeros(2, n_features))")
    was_training = model.training
    model.train()
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    except Exception as e:  # the exporter's many ways to say no
        raise ModelNotExportable(
            f"the model cannot be exported as a graph ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "use standard layers and no Python control flow that depends on the data"
        ) from None
    finally:
        model.train(was_training)
    return bytes(ser.serialize(program).exported_program)
