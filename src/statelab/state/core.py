"""The ``State`` value: everything a stateful SSM language model carries from one call to the next.

Layouts (letters from :mod:`statelab.glossary`), all layers stacked on the first axis:

| arch     | ssm               | conv                 | sum_delta    |
|----------|-------------------|----------------------|--------------|
| mamba1   | [L, B, D, N]      | [L, B, D, K - 1]     | [L, B, D]    |
| mamba2   | [L, B, H, P, N]   | [L, B, C, K - 1]     | [L, B, H]    |

A state is "after token ``n``": row ``b`` has consumed tokens ``[0, tokens[b])`` of its own sequence. Rows of one
batch may have consumed different numbers of tokens (a ragged batch); ``tokens`` always has one count per row,
and ``n_tokens`` is that count as a single int when every row agrees (the tuple otherwise). ``sum_delta`` is kept
in fp32 whatever the dtype of the other parts, because ordered composition exponentiates it.

``State`` is immutable in the sense that matters: no statelab call writes into the tensors of a state it was
given. Methods return new states; ``clone`` gives tensors that share no memory with the original.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from statelab.errors import StateMismatchError

__all__ = ["State", "ARCH_SSM_RANK"]

# Number of per-sequence SSM dims after [L, B]: mamba1 [D, N], mamba2 [H, P, N].
ARCH_SSM_RANK: dict[str, int] = {"mamba1": 2, "mamba2": 3}


@dataclass(frozen=True, eq=False)
class State:
    """Recurrent state of a whole model for a batch of sequences.

    Attributes:
        arch: ``"mamba1"`` or ``"mamba2"``.
        ssm: SSM state, ``[L, B, D, N]`` (mamba1) or ``[L, B, H, P, N]`` (mamba2).
        conv: last ``K - 1`` pre-conv inputs per layer, oldest first, ``[L, B, C, K - 1]``.
        sum_delta: ΣΔ over the consumed tokens, ``[L, B, D]`` (mamba1) or ``[L, B, H]`` (mamba2), fp32.
        n_tokens: how many tokens each row has consumed: an int when every row agrees, else a tuple with one
            count per row. The constructor accepts an int (every row) or a sequence of ``B`` ints; read
            ``tokens`` for the per-row tuple in either case.
        fingerprint: the fingerprint of the model that made the state (hash of its config and weights).
    """

    arch: str
    ssm: torch.Tensor
    conv: torch.Tensor
    sum_delta: torch.Tensor
    n_tokens: int | tuple[int, ...]
    fingerprint: str

    def __post_init__(self) -> None:
        if self.arch not in ARCH_SSM_RANK:
            raise StateMismatchError(f"unknown state architecture {self.arch!r}; known: {sorted(ARCH_SSM_RANK)}")
        want = 2 + ARCH_SSM_RANK[self.arch]
        if self.ssm.dim() != want:
            raise StateMismatchError(f"{self.arch} ssm state must have {want} dims, got {tuple(self.ssm.shape)}")
        if self.conv.dim() != 4:
            raise StateMismatchError(f"conv state must be [L, B, C, K-1], got {tuple(self.conv.shape)}")
        if self.sum_delta.dim() != 3:
            raise StateMismatchError(f"sum_delta must be [L, B, D|H], got {tuple(self.sum_delta.shape)}")
        L, B = self.ssm.shape[:2]
        for name in ("conv", "sum_delta"):
            t = getattr(self, name)
            if tuple(t.shape[:2]) != (L, B):
                raise StateMismatchError(f"{name} leads with {tuple(t.shape[:2])} but ssm with (L={L}, B={B})")
        if self.sum_delta.dtype != torch.float32:
            raise StateMismatchError(f"sum_delta must be float32, got {self.sum_delta.dtype}")
        if not self.ssm.is_floating_point() or self.conv.dtype != self.ssm.dtype:
            raise StateMismatchError(
                f"ssm and conv must share one floating dtype, got {self.ssm.dtype} and {self.conv.dtype}"
            )
        object.__setattr__(self, "n_tokens", _normalise_tokens(self.n_tokens, B))

    @property
    def tokens(self) -> tuple[int, ...]:
        """Tokens consumed by each row, ``(n_0, ..., n_{B-1})`` (the same number repeated for a uniform batch)."""
        n = self.n_tokens
        return n if isinstance(n, tuple) else (n,) * self.batch_size

    @property
    def ragged(self) -> bool:
        """True when rows consumed different numbers of tokens."""
        return isinstance(self.n_tokens, tuple)

    # ---- shape facts -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.ssm.shape[0]

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.ssm.dtype

    @property
    def device(self) -> torch.device:
        return self.ssm.device

    @property
    def layout(self) -> dict[str, list[int]]:
        """Per-sequence shapes of each part (without L and B), as stored in state files."""
        return {
            "ssm": list(self.ssm.shape[2:]),
            "conv": list(self.conv.shape[2:]),
            "sum_delta": list(self.sum_delta.shape[2:]),
        }

    # ---- value operations --------------------------------------------------------------------------------
    def replace(self, **changes) -> State:
        """A new state with some fields replaced (validated like any new state)."""
        return dataclasses.replace(self, **changes)

    def clone(self) -> State:
        """Deep copy: the new tensors share no memory with this state."""
        return self.replace(ssm=self.ssm.clone(), conv=self.conv.clone(), sum_delta=self.sum_delta.clone())

    def detach(self) -> State:
        """Cut the autograd history (for truncated backpropagation); shares memory like ``Tensor.detach``."""
        return self.replace(ssm=self.ssm.detach(), conv=self.conv.detach(), sum_delta=self.sum_delta.detach())

    def to(self, *args, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None) -> State:
        """Move to a device and/or cast ``ssm`` and ``conv`` to ``dtype``; ``sum_delta`` stays fp32.

        Takes ``Tensor.to``'s call shapes: ``to(dtype)``, ``to(device)``, ``to(device, dtype)``, ``to(tensor)`` (its
        device and dtype) and the keywords ``device=`` / ``dtype=``. ``dtype`` must be a floating dtype.

        Example:
            >>> state.to(torch.bfloat16); state.to("cpu"); state.to("cuda", torch.float16)  # doctest: +SKIP
        """
        if len(args) > 2:
            raise TypeError(f"State.to takes at most a device and a dtype, got {len(args)} arguments")
        for a in args:
            if isinstance(a, torch.dtype):
                if dtype is not None:
                    raise TypeError("State.to got two dtypes")
                dtype = a
            elif isinstance(a, torch.Tensor):
                if device is not None or dtype is not None:
                    raise TypeError("State.to(tensor) takes no other device or dtype")
                device, dtype = a.device, a.dtype
            elif isinstance(a, torch.device | str | int) and not isinstance(a, bool):
                if device is not None:
                    raise TypeError("State.to got two devices")
                device = a
            else:
                raise TypeError(f"State.to takes a device, a dtype or a tensor, got {type(a).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise StateMismatchError(f"a state's ssm and conv parts must be floating point, got dtype {dtype}")
        return self.replace(
            ssm=self.ssm.to(device=device, dtype=dtype),
            conv=self.conv.to(device=device, dtype=dtype),
            sum_delta=self.sum_delta.to(device=device),
        )

    def select(self, index: int | slice | Sequence[int] | torch.Tensor) -> State:
        """Rows ``index`` of the batch, as a new state (an int keeps the batch axis, with size 1)."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise StateMismatchError(f"batch index {index} out of range for batch size {self.batch_size}")
            index = [index]
        rows = list(range(self.batch_size))
        if isinstance(index, slice):
            pick = lambda t: t[:, index].clone()  # noqa: E731
            rows = rows[index]
        else:
            idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
            if idx.dim() > 1:
                raise StateMismatchError(f"batch indices must be one-dimensional, got shape {tuple(idx.shape)}")
            if idx.numel() and (idx.max() >= self.batch_size or idx.min() < -self.batch_size):
                raise StateMismatchError(f"batch indices {idx.tolist()} out of range for {self.batch_size}")
            idx = idx % self.batch_size
            pick = lambda t: t.index_select(1, idx)  # noqa: E731
            rows = idx.tolist()
        tokens = self.tokens
        return self.replace(
            ssm=pick(self.ssm),
            conv=pick(self.conv),
            sum_delta=pick(self.sum_delta),
            n_tokens=tuple(tokens[r] for r in rows),
        )

    def expand(self, n: int) -> State:
        """Branch ``n`` continuations: repeat every row ``n`` times (row-major), as independent copies."""
        if n < 1:
            raise StateMismatchError(f"expand needs n >= 1, got {n}")
        rep = lambda t: t.repeat_interleave(n, dim=1)  # noqa: E731  (always materialises: no aliasing)
        return self.replace(
            ssm=rep(self.ssm),
            conv=rep(self.conv),
            sum_delta=rep(self.sum_delta),
            n_tokens=tuple(c for c in self.tokens for _ in range(n)),
        )

    @staticmethod
    def cat(states: Sequence[State]) -> State:
        """Concatenate states of the same model along the batch axis; every row keeps its own token count, so
        states that consumed different numbers of tokens make one ragged batch."""
        if not states:
            raise StateMismatchError("cat needs at least one state")
        first = states[0]
        for s in states[1:]:
            first.check_like(s)
        return first.replace(
            ssm=torch.cat([s.ssm for s in states], 1),
            conv=torch.cat([s.conv for s in states], 1),
            sum_delta=torch.cat([s.sum_delta for s in states], 1),
            n_tokens=tuple(c for s in states for c in s.tokens),
        )

    def check_like(self, other: State) -> None:
        """Raise ``StateMismatchError`` unless ``other`` comes from the same model with the same layout."""
        if other.arch != self.arch:
            raise StateMismatchError(f"architecture mismatch: {self.arch} vs {other.arch}")
        if other.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"states come from different models: fingerprint {self.fingerprint[:16]} vs {other.fingerprint[:16]}"
            )
        if other.layout != self.layout or other.num_layers != self.num_layers:
            raise StateMismatchError(
                f"layout mismatch: L={self.num_layers} {self.layout} vs L={other.num_layers} {other.layout}"
            )
        if other.dtype != self.dtype:
            raise StateMismatchError(f"dtype mismatch: {self.dtype} vs {other.dtype}")

    def save(self, path, **meta):
        """Write this state to a verified safetensors file; ``meta`` as in :func:`statelab.state.io.save_state`."""
        from statelab.state.io import save_state

        return save_state(self, path, **meta)

    def equal(self, other: State) -> bool:
        """Bitwise equality of every part and field."""
        return (
            self.arch == other.arch
            and self.fingerprint == other.fingerprint
            and self.n_tokens == other.n_tokens
            and self.ssm.shape == other.ssm.shape
            and self.conv.shape == other.conv.shape
            and self.ssm.dtype == other.ssm.dtype
            and torch.equal(self.ssm, other.ssm)
            and torch.equal(self.conv, other.conv)
            and torch.equal(self.sum_delta, other.sum_delta)
        )

    def __repr__(self) -> str:
        return (
            f"State(arch={self.arch}, layers={self.num_layers}, batch={self.batch_size}, "
            f"ssm={list(self.ssm.shape[2:])}, conv={list(self.conv.shape[2:])}, dtype={self.dtype}, "
            f"n_tokens={self.n_tokens}, model={self.fingerprint[:12]})"
        )


def _normalise_tokens(n: object, batch_size: int) -> int | tuple[int, ...]:
    """An int (every row) or ``B`` per-row counts -> the int when all rows agree, else the tuple of counts."""
    if isinstance(n, torch.Tensor):
        if n.dim() > 1:
            raise StateMismatchError(f"n_tokens must be an int or one count per row, got shape {tuple(n.shape)}")
        n = n.tolist()
    if isinstance(n, bool):
        raise StateMismatchError(f"n_tokens must be an int or one count per row, got {n!r}")
    if isinstance(n, int):
        counts: tuple[int, ...] = (n,) * max(batch_size, 1)
    elif isinstance(n, Sequence) and not isinstance(n, str):
        counts = tuple(n)
        if len(counts) != batch_size:
            raise StateMismatchError(f"n_tokens has {len(counts)} counts but the state has {batch_size} rows")
    else:
        raise StateMismatchError(f"n_tokens must be an int or one count per row, got {type(n).__name__}")
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int):
            raise StateMismatchError(f"token counts must be ints, got {c!r}")
        if c < 0:
            raise StateMismatchError(f"token counts must be >= 0, got {c}")
    if batch_size == 0:
        return counts[0] if isinstance(n, int) else 0
    return counts[0] if all(c == counts[0] for c in counts) else counts
