"""What the one-token decode step (``StatefulLM.step``) shares: matrix-vector products in the layout that is fast
for one token, and the cache that keeps that layout next to the model's weights.

**Why a second layout.** A decode step reads every weight once per token, so it runs at the speed the matrix-vector
products stream weights from memory. On CPUs (MKL, AVX2) ``x [B, in] @ Wt [in, out]`` with ``Wt`` contiguous
streams faster than ``F.linear(x, W [out, in])``: measured at one thread on the 130m-sized Mamba-1's matrices
(513 MB, far beyond the cache), 29-31 ms against 38-39 ms per token (17 against 13 GB/s; the machine reads 18 GB/s
with one thread). The decode path therefore keeps a transposed, contiguous copy of each matrix it multiplies on a
CPU; this doubles the memory the matrices take while the copy exists (``StatefulLM.drop_decode_cache`` frees it).
On other devices the weights are used as they are.

The cache is rebuilt when any parameter changes (a new tensor or an in-place update: tracked by data pointer and
version counter, as the fingerprint is), so a model trained between two generations never decodes with stale
copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Matvec", "matvec", "transposed_layout", "cached_plan", "drop_plan"]

_PLAN = "_decode_plan"


class Matvec(NamedTuple):
    """A linear map for a few rows: ``weight`` is ``[in, out]`` (contiguous) when ``transposed``, else the module's
    ``[out, in]``; ``bias [out]`` or ``None``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in]`` (cast to the weight's dtype) -> ``[B, out]``."""
        x = x.to(self.weight.dtype)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)


def transposed_layout(device: torch.device) -> bool:
    """Whether matrices are kept transposed for decoding on ``device`` (CPUs: yes, see the module docstring)."""
    return device.type == "cpu"


def matvec(
    weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, dtype: torch.dtype | None = None
) -> Matvec:
    """A :class:`Matvec` of ``weight [out, in]`` (detached; copied when ``transposed`` or cast to ``dtype``)."""
    w = weight.detach()
    b = None if bias is None else bias.detach()
    if dtype is not None:
        w = w.to(dtype)
        b = None if b is None else b.to(dtype)
    if transposed:
        w = w.t().contiguous()
    return Matvec(w, b, transposed)


def _version_key(module: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters())


def cached_plan(module: nn.Module, build: Callable[[], Any]) -> Any:
    """``build()``'s result, cached on ``module`` until one of its parameters changes."""
    key = _version_key(module)
    cached = module.__dict__.get(_PLAN)
    if cached is not None and cached[0] == key:
        return cached[1]
    module.__dict__[_PLAN] = None  # free the old copies before building new ones
    plan = build()
    module.__dict__[_PLAN] = (key, plan)
    return plan


def drop_plan(module: nn.Module) -> None:
    """Forget the cached plan (and the weight copies it holds)."""
    module.__dict__.pop(_PLAN, None)
