"""The one call shape of every mixer in :mod:`statelab.layers`, and the pieces it shares.

Every mixer is called as::

    y, state = layer(x, state=None, *, positions=None, lengths=None, segments=None)

* ``x [B, T, ...]`` continues the sequence that ``state`` has read (``None`` = the state before any token); the
  returned ``state`` is the state after the last (real) token. The given state is never modified.
* ``positions``: counts ``p`` of tokens of this call; the states after the first ``p`` tokens come back **inside
  the returned state**, in its ``at`` field, each part stacked on axis 1 (``[B, n_pos, ...]``, the
  :mod:`statelab.ops` convention); without ``positions`` ``at`` is ``None``. The Mamba-1 and Mamba-2 mixers
  honour it; the mixers whose state is a bare tensor, a tuple or a cache (gated SSM, Hawk, the split Mamba-2,
  S5, GD-SSM, attention, linear attention) refuse it with a ``ValueError``; their models take states at
  positions by running the pieces between them one after another, which is exact for a causal pass
  (:class:`statelab.models.birdie_models.BirdieLM`).
* ``lengths [B]``: right padding; row ``b`` is ``x[b, :lengths[b]]`` and its state stops after its own last real
  token (outputs at padded positions are unspecified). Honoured by Mamba-1, Mamba-2, the gated SSM, Hawk and the
  split Mamba-2.
* ``segments``: packed samples (:class:`Segments`): recurrences and conv windows restart at each sample start, and
  bidirectional layers read each sample's prefix backwards. Honoured by the Birdie layers (gated SSM, Hawk, split
  Mamba-2).

A mixer that cannot honour one of these keywords raises ``ValueError`` naming it (never ignores it).

**Backend.** The implementation is a constructor argument ``backend=...`` of every mixer, validated there against
the mixer's ``BACKENDS`` (a ``ValueError`` naming the choices); the ``backend`` attribute validates the same way
when a model switches the backend of layers it already holds. ``forward`` takes no backend.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

__all__ = ["Segments", "Mixer", "check_backend"]


class Segments(NamedTuple):
    """Packed samples in a batch of rows.

    Attributes:
        seq_start: ``[B, T]`` bool, True at each sample's first token; ``None``: no sample starts inside the call
            (the rows continue the samples their states are in).
        is_prefix: ``[B, T]`` bool, True on each sample's input (prefix) part, False on its suffix and on padding;
            ``None`` means no prefix anywhere (every layer runs causally).
    """

    seq_start: torch.Tensor | None
    is_prefix: torch.Tensor | None = None


def check_backend(owner: str, backend: object, choices: tuple[str, ...]) -> str:
    """``backend`` if it is one of ``choices``, else a ``ValueError`` naming ``owner`` and the choices."""
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"{owner}: unknown backend {backend!r}; choose one of {choices}")
    return backend


class Mixer(nn.Module):
    """Base of the mixers: the validated ``backend`` attribute and the refusal of unsupported keywords.

    Subclasses set ``BACKENDS`` (their choices, the first is the default) and ``SUPPORTS`` (the keywords among
    ``positions``, ``lengths``, ``segments`` they honour).
    """

    BACKENDS: ClassVar[tuple[str, ...]] = ()
    SUPPORTS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = self.BACKENDS[0] if backend is None else backend

    @property
    def backend(self) -> str:
        """The implementation this mixer runs (one of ``BACKENDS``)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(type(self).__name__, value, self.BACKENDS)

    def refuse_unsupported(self, **given: object) -> None:
        """Raise ``ValueError`` for a keyword given (not ``None``) that this mixer does not honour."""
        for name, value in given.items():
            if value is not None and name not in self.SUPPORTS:
                raise ValueError(
                    f"{type(self).__name__} does not support {name}=; it honours only {sorted(self.SUPPORTS) or 'none'}"
                )
