"""Saving model weights so they can be matched to the private training run that produced them.

The **canonical parameter hash** of a model is the SHA-256 of the bytes that
``safetensors.torch.save(tensors)`` produces (no metadata) for ``tensors`` = the model's
``state_dict()`` (parameters and buffers; an Opacus wrapper's ``_module.`` prefix removed), each tensor
detached, on the CPU, contiguous. safetensors writes its header with the names sorted and the data in a
fixed order, so the same tensors give the same bytes whatever their order in the dict.

- :func:`save_weights` writes exactly those bytes, so ``sha256(file) == canonical hash`` for its files;
  the training record of each run carries the hash of the model at the end of training
  (``weights_sha256``).
- :func:`file_sha256` hashes any safetensors file canonically (reads the tensors, drops metadata and
  re-serialises), so a file written with other metadata or another tool still matches. The airlock
  looks a file up under both its plain SHA-256 and this one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import nn

from paitient.fsutil import atomic_write_bytes


def state_tensors(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors that are hashed and saved: the model's state dict, unwrapped, detached, CPU, contiguous."""
    if isinstance(model, nn.Module):
        inner = getattr(model, "_module", None)  # Opacus' GradSampleModule
        state = (inner if isinstance(inner, nn.Module) else model).state_dict()
    else:
        state = model
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def canonical_bytes(model: nn.Module | dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of :func:`state_tensors` (no metadata): what is hashed and saved."""
    return save(state_tensors(model))


def weights_sha256(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """The canonical parameter hash of a model (see the module documentation)."""
    return hashlib.sha256(canonical_bytes(model)).hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """Save the model's weights as safetensors (atomically) and return their canonical SHA-256.

    Give this file to the airlock: its hash matches the training record of the run that produced
    these weights (if the model was not changed after training).
    """
    data = canonical_bytes(model)
    atomic_write_bytes(Path(path), data, mode=0o644)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Canonical SHA-256 of a safetensors file written by any tool (metadata and layout ignored)."""
    return hashlib.sha256(save(load(Path(path).read_bytes()))).hexdigest()
