"""An adapter as one flat vector and back: the layout secure aggregation and HE work on.

Tensors are concatenated in sorted name order, each flattened row-major; every party derives
the same layout from the adapter template alone, so no layout travels with an update.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedsilo.model.adapters import AdapterState


def flat_length(like: AdapterState, select: Callable[[str], bool] = lambda _: True) -> int:
    """Number of values in the selected tensors of ``like``."""
    return sum(like[name].numel() for name in sorted(like) if select(name))


def flatten(state: AdapterState, select: Callable[[str], bool] = lambda _: True) -> np.ndarray:
    """The selected tensors of ``state`` as one float64 vector (sorted names, row-major)."""
    parts = [state[name].detach().double().reshape(-1).numpy() for name in sorted(state)]
    chosen = [part for name, part in zip(sorted(state), parts, strict=True) if select(name)]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.float64)


def unflatten(
    vector: np.ndarray, like: AdapterState, select: Callable[[str], bool] = lambda _: True
) -> AdapterState:
    """The inverse of :func:`flatten` for the selected tensors of ``like`` (float32)."""
    expected = flat_length(like, select)
    if vector.shape != (expected,):
        raise ValueError(f"flat vector has shape {vector.shape}, expected ({expected},)")
    out: AdapterState = {}
    offset = 0
    for name in sorted(like):
        if not select(name):
            continue
        size = like[name].numel()
        chunk = np.asarray(vector[offset : offset + size], dtype=np.float32)
        out[name] = torch.from_numpy(chunk.copy()).reshape(like[name].shape)
        offset += size
    return out
