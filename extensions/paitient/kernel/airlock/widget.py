"""An ipywidgets form for :func:`paitient.kernel.airlock.request`, for researchers who prefer not to type the call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paitient.kernel.airlock.client import AirlockCheckFailed, AirlockError, request, status
from paitient.kernel.airlock.spec import KINDS

if TYPE_CHECKING:
    from ipywidgets import VBox


def form() -> VBox:
    """Show a form: file, kind, justification (and for weights: model class, target, holdout split)."""
    import ipywidgets as w
    from IPython.display import display

    path = w.Text(description="File", placeholder="results/table.csv")
    kind = w.Dropdown(description="Kind", options=list(KINDS), value="table")
    project = w.Text(description="Project", placeholder="(only needed if you are in several)")
    why = w.Textarea(
        description="Why",
        placeholder="What is it, and why must it leave the workspace?",
        layout=w.Layout(width="40em", height="6em"),
    )
    model = w.Text(description="Model class", placeholder="name of the nn.Module class in this notebook")
    target = w.Text(description="Target column")
    holdout = w.FloatText(description="Holdout", value=0.3)
    seed = w.IntText(description="Split seed", value=0)
    weights_box = w.VBox([model, target, holdout, seed], layout=w.Layout(display="none"))
    submit = w.Button(description="Submit to the airlock", button_style="primary")
    out = w.Output()

    def on_kind(change: dict[str, Any]) -> None:
        weights_box.layout.display = "" if change["new"] == "weights" else "none"

    def on_submit(_: Any) -> None:
        out.clear_output()
        with out:
            try:
                extra: dict[str, Any] = {}
                if kind.value == "weights":
                    from IPython import get_ipython

                    ns = get_ipython().user_ns if get_ipython() else {}
                    if model.value not in ns:
                        raise AirlockError(f"no class {model.value!r} in this notebook; define it first")
                    extra = {
                        "model_source": ns[model.value],
                        "target": target.value or None,
                        "split": {"holdout": holdout.value, "seed": seed.value},
                    }
                # A button's callback cannot prompt (input() belongs to a cell's execution): a request whose
                # checks would fail is not filed from the form, and the checks are shown with their fixes.
                rid = request(
                    path.value,
                    kind=kind.value,
                    justification=why.value,
                    project=project.value or None,
                    confirm=False,
                    **extra,
                )
                print(f"Submitted: request {rid}. Follow it with paitient.kernel.airlock.status({rid!r}).")
                display(status())
            except AirlockCheckFailed as e:
                print(f"Not submitted: {e}")
                display(e.result)
            except AirlockError as e:
                print(f"Not submitted: {e}")

    kind.observe(on_kind, names="value")
    submit.on_click(on_submit)
    box = w.VBox([path, kind, project, why, weights_box, submit, out])
    display(box)
    return box
