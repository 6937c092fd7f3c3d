"""The ``State`` value: everything a stateful language model carries from one call to the next.

Layouts (letters from :mod:`statelab.glossary`), all layers stacked on the first axis, one entry per architecture
in the registry :data:`ARCH_LAYOUTS` (:func:`register_arch`):

| arch                | ssm                   | conv                  | sum_delta  |
|---------------------|-----------------------|-----------------------|------------|
| mamba1              | [L, B, D, N]          | [L, B, D, K - 1]      | [L, B, D]  |
| mamba2              | [L, B, H, P, N]       | [L, B, C, K - 1]      | [L, B, H]  |
| birdie_gated_ssm    | [L, B, D]             | [L, B, 0, 0]          | [L, B, 0]  |
| birdie_hawk         | [L, B, D]             | [L, B, D, K - 1]      | [L, B, 0]  |
| birdie_mamba2       | [L, B, H, P, N]       | [L, B, C, K - 1]      | [L, B, 0]  |
| birdie_transformer  | keys [L, B, H, S, P]  | values [L, B, H, S, P]| [L, B, 0]  |

The Birdie stacks (:mod:`statelab.models.birdie_models`) track no ΣΔ (an empty last axis), so ordered composition
refuses their states; their bidirectional-prefix layers keep only the forward half of the channels (heads), which
fill the first half of the layer's entries, the rest staying zero. The Transformer's "state" is its key/value
cache: its ``S`` axis grows with the tokens read (the registry marks it as the token axis; ``S`` is at least the
largest row count and row ``b``'s entries past ``tokens[b]`` are ignored), so states of different lengths still
batch (:meth:`State.cat` pads that axis), but a cache is not a fixed-size summary and :func:`statelab.mix` refuses it.

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

__all__ = ["State", "ArchLayout", "ARCH_LAYOUTS", "ARCH_SSM_RANK", "register_arch"]


@dataclass(frozen=True)
class ArchLayout:
    """How the states of one architecture are laid out.

    Attributes:
        ssm_rank, conv_rank, delta_rank: per-sequence dims (after ``[L, B]``) of ``ssm``, ``conv`` and ``sum_delta``.
        tracks_delta: whether ``sum_delta`` holds ΣΔ (ordered composition needs it).
        token_axis: the per-sequence axis of ``ssm`` and ``conv`` that grows with the tokens read (a cache), or
            ``None`` for a fixed-size state.
        description: one line for people (what the parts hold).
    """

    ssm_rank: int
    conv_rank: int = 2
    delta_rank: int = 1
    tracks_delta: bool = True
    token_axis: int | None = None
    description: str = ""


#: arch name -> its layout. Extended by :func:`register_arch` (the model module of a new architecture calls it).
ARCH_LAYOUTS: dict[str, ArchLayout] = {}

# Number of per-sequence SSM dims after [L, B] for every registered arch (kept in step with ARCH_LAYOUTS).
ARCH_SSM_RANK: dict[str, int] = {}


def register_arch(name: str, layout: ArchLayout) -> ArchLayout:
    """Register (or confirm) the state layout of architecture ``name``; a different layout under a taken name is an
    error."""
    known = ARCH_LAYOUTS.get(name)
    if known is not None and known != layout:
        raise StateMismatchError(f"architecture {name!r} is already registered with another layout: {known}")
    if layout.token_axis is not None and not 0 <= layout.token_axis < min(layout.ssm_rank, layout.conv_rank):
        raise StateMismatchError(f"token_axis {layout.token_axis} is outside the parts of {name!r}")
    ARCH_LAYOUTS[name] = layout
    ARCH_SSM_RANK[name] = layout.ssm_rank
    return layout


register_arch("mamba1", ArchLayout(2, description="Mamba-1: ssm [D, N], conv [D, K-1], ΣΔ [D]"))
register_arch("mamba2", ArchLayout(3, description="Mamba-2: ssm [H, P, N], conv [C, K-1], ΣΔ [H]"))
register_arch(
    "birdie_gated_ssm",
    ArchLayout(1, tracks_delta=False, description="Birdie gated SSM: ssm [D] (forward half first), no conv"),
)
register_arch(
    "birdie_hawk",
    ArchLayout(1, tracks_delta=False, description="Birdie Hawk (RG-LRU): ssm [D] (forward half first), conv [D, K-1]"),
)
register_arch(
    "birdie_mamba2",
    ArchLayout(3, tracks_delta=False, description="Birdie Mamba-2: ssm [H, P, N] (forward heads first), conv [C, K-1]"),
)
register_arch(
    "birdie_transformer",
    ArchLayout(
        3, conv_rank=3, tracks_delta=False, token_axis=1, description="Birdie Transformer: keys and values [H, S, P]"
    ),
)


@dataclass(frozen=True, eq=False)
class State:
    """Recurrent state of a whole model for a batch of sequences.

    Attributes:
        arch: a registered architecture (:data:`ARCH_LAYOUTS`: ``"mamba1"``, ``"mamba2"``, the Birdie stacks).
        ssm: SSM state, ``[L, B, D, N]`` (mamba1) or ``[L, B, H, P, N]`` (mamba2); see the module table.
        conv: last ``K - 1`` pre-conv inputs per layer, oldest first, ``[L, B, C, K - 1]``; see the module table.
        sum_delta: ΣΔ over the consumed tokens, ``[L, B, D]`` (mamba1) or ``[L, B, H]`` (mamba2), fp32 (an empty
            last axis for architectures that track none).
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
        spec = ARCH_LAYOUTS.get(self.arch)
        if spec is None:
            raise StateMismatchError(f"unknown state architecture {self.arch!r}; known: {sorted(ARCH_LAYOUTS)}")
        want = 2 + spec.ssm_rank
        if self.ssm.dim() != want:
            raise StateMismatchError(f"{self.arch} ssm state must have {want} dims, got {tuple(self.ssm.shape)}")
        if self.conv.dim() != 2 + spec.conv_rank:
            if spec.conv_rank == 2:
                raise StateMismatchError(f"conv state must be [L, B, C, K-1], got {tuple(self.conv.shape)}")
            raise StateMismatchError(
                f"{self.arch} conv part must have {2 + spec.conv_rank} dims, got {tuple(self.conv.shape)}"
            )
        if self.sum_delta.dim() != 2 + spec.delta_rank:
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

    @property
    def arch_layout(self) -> ArchLayout:
        """This state's entry of the architecture registry."""
        return ARCH_LAYOUTS[self.arch]

    @property
    def layout_key(self) -> dict[str, list[int]]:
        """``layout`` with the token axis of a cache (:attr:`ArchLayout.token_axis`) shown as ``-1``: two states
        that fit the same model have the same key whatever their lengths."""
        axis = self.arch_layout.token_axis
        out = self.layout
        if axis is not None:
            out["ssm"][axis] = out["conv"][axis] = -1
        return out

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
        axis = first.arch_layout.token_axis
        if axis is not None:  # caches of different lengths: pad the token axis (entries past a row's count are unused)
            width = max(s.ssm.shape[2 + axis] for s in states)

            def pad(t: torch.Tensor) -> torch.Tensor:
                extra = width - t.shape[2 + axis]
                if not extra:
                    return t
                shape = list(t.shape)
                shape[2 + axis] = extra
                return torch.cat([t, t.new_zeros(shape)], 2 + axis)

            states = [s.replace(ssm=pad(s.ssm), conv=pad(s.conv)) for s in states]
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
        if other.layout_key != self.layout_key or other.num_layers != self.num_layers:
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
