"""The Python source of a model class, to send with its weights: from its module's file, or from the
notebook cell that defined it (IPython's input history)."""

from __future__ import annotations

import ast
import inspect


class SourceNotFound(LookupError):
    """Neither a file nor this session's input history holds the class's definition."""


PREAMBLE = "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n"
"""Imports put before a class taken from a notebook cell (the cell's own imports are elsewhere)."""


def class_source(cls: type) -> str:
    """Source defining ``cls``: its whole module if it comes from a file, else the notebook cell's class."""
    module = inspect.getmodule(cls)
    try:
        if module is not None and module.__name__ != "__main__":
            return inspect.getsource(module)
        body = inspect.getsource(cls)
    except (OSError, TypeError):
        body = class_from_history(cls.__name__)
    return PREAMBLE + body


def class_from_history(name: str) -> str:
    """The latest definition of class ``name`` in this IPython session's input history."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        cells = list((shell.user_ns.get("In") or []) if shell else [])
    except ImportError:
        cells = []
    for cell in reversed(cells):
        try:
            tree = ast.parse(cell)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return ast.get_source_segment(cell, node, padded=True) or ""
    raise SourceNotFound(f"cannot find the source of {name}")
