"""Nested run state (samplers, controllers, callbacks) as safetensors plus a JSON skeleton, exactly and without
pickle.

A state tree is made of dicts (string or integer keys), lists, tuples, ``None``, bools, ints, floats, strings, torch
tensors and numpy arrays. :func:`pack` moves every tensor and array into a flat ``{key: tensor}`` dict (saved as
safetensors) and leaves a JSON-able skeleton that names them; :func:`unpack` puts them back. Floats survive JSON
exactly (Python writes the shortest repr that reads back to the same double), NaN and infinities included, so a
restored tree is bit-identical to the saved one.

Example:
    >>> import numpy as np, torch
    >>> tensors, skeleton = pack({"step": 3, "w": torch.ones(2), "p": np.array([0.25, 0.75]), 7: (1, None)})
    >>> back = unpack(tensors, skeleton)
    >>> back["step"], back["w"].tolist(), back["p"].tolist(), back[7]
    (3, [1.0, 1.0], [0.25, 0.75], (1, None))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from statelab.errors import CheckpointError

__all__ = ["pack", "unpack", "save_tree", "load_tree"]


def pack(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, skeleton)`` of a state tree (see the module docstring); tensors are detached CPU copies."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = str(len(tensors))
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x).copy())
            return {"__ndarray__": key}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k.startswith("__") for k in x):
                return {k: walk(v) for k, v in x.items()}
            return {"__items__": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a run state (tensors, arrays and plain data only)")

    return tensors, walk(tree)


def unpack(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The state tree that :func:`pack` split into ``tensors`` and ``skeleton``."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return tensors[x["__ndarray__"]].numpy()
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__items__" in x:
                return {k: walk(v) for k, v in x["__items__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    try:
        return walk(skeleton)
    except KeyError as e:
        raise CheckpointError(f"run state names tensor {e} that its file does not hold") from e


def save_tree(path: str | Path, tree: Any) -> Any:
    """Write the tensors of ``tree`` to the safetensors file ``path``; returns the JSON skeleton to keep beside it."""
    tensors, skeleton = pack(tree)
    safetensors.torch.save_file(tensors, str(path))
    return skeleton


def load_tree(path: str | Path, skeleton: Any) -> Any:
    """The tree saved by :func:`save_tree` at ``path`` with ``skeleton``."""
    return unpack(safetensors.torch.load_file(str(path)), skeleton)
