"""GD-SSM: a diagonal linear recurrence with a windowed bilinear input and a gated readout that does GD in context.

Follows arXiv 2410.11687 (Mohan Sushma, Tian et al., "State-space models can learn in-context by gradient
descent") and its public JAX code (github.com/Efficient-Scalable-Machine-Learning/gd-ssm); the constructions below
are derived algebraically and checked against closed-form GD in ``tests/layers/test_gd_ssm.py``.

Letters (see :mod:`statelab.glossary`; here P is the state rows, d the token width, W windows):

* tokens ``x_1, y_1, x_2, y_2, ..., x_N, y_N, x_q``: ``[B, T, d]`` (a scalar ``y`` sits in the last coordinate);
* window i: ``E_i = [x_i; y_i; x_{i+1}]`` = tokens ``(2i-2, 2i-1, 2i)``, stride 2, ``x_{N+1} := x_q``:
  ``[B, W, 3, d]``;
* bilinear input ``A_i = Σ_{k,l} W_q[k,l] e_{i,k} e_{i,l}ᵀ`` (``W_q: [3, 3]``, no softmax, no Q/K/V);
* recurrence ``S_i = Λ̄ ⊙ S_{i-1} + A_iᵀ`` with one decay per state entry, ``Λ̄ = exp(Λ ⊙ Δ)``, ``Λ: [P, d]``,
  ``Δ = exp(log_step): [d]`` (S5 zero-order hold); ``S: [B, P, d]``;
* gated readout ``z_i = C S_i g_i`` with ``C: [d, P]`` and the gate ``g_i = Σ_k D_k e_{i,k}`` (``D: [3]``);
* prediction ``−z_i`` (von Oswald's sign convention, made explicit here): window i predicts ``y_{i+1}`` from the
  first i examples, so one pass gives the whole in-context curve.

**Stacking.** Layer ℓ of an L-layer model reads its recurrence input from the same token windows and passes a
query-side vector: ``g^ℓ_i = o^ℓ_i + a^{ℓ-1}_i`` (``a^0 = 0``), ``z^ℓ_i = C_ℓ S^ℓ_i g^ℓ_i``, ``a^ℓ_i = g^ℓ_i + z^ℓ_i``;
the model predicts ``−z^L_i``. With ``Σ̂``-accumulators ``G_i = Σ_{j≤i} x_j x_jᵀ`` (``W_q = e₁e₁ᵀ``) in layers
1..k-1 and ``H_i = Σ_{j≤i} y_j x_jᵀ`` (``W_q = e₁e₂ᵀ``) in layer k, all with ``C = −(η/N) I``, ``D = e₃``, ``Λ̄ = 1``,
the gate is Horner's scheme ``g^{ℓ+1} = x_{i+1} + (I − cG_i) g^ℓ`` and the prediction is
``cH_i Σ_{m<k} (I − cG_i)^m x_{i+1} = W_k x_{i+1}``: k-step GD on every prefix, exact, causal (:meth:`GDSSM.from_gd`).

**Fast path.** The recurrence is time-invariant, so a chunk of Q windows is computed at once: the intra-chunk part
contracts a ``[Q, Q, P, d]`` table of decay powers ``Λ̄^{t-j}`` (lower triangle), the inter-chunk part carries the
state (:func:`statelab.ops.diag_scan.diag_scan_chunk`); ``diag_scan_naive`` is the plain fp32 loop it is tested
against. The backend is chosen when the model is built (``GDSSM(config, backend="naive")``).

**Parameters.** No input matrix B (the public code declares one the recurrence never uses), no layer norm, no
dropout. ``C`` is LeCun-normal real (the public code takes the real part of a complex init in the HiPPO basis).
``decay="real"`` lets Λ take any real value (Λ̄ = 1 exactly at Λ = 0, as the construction needs; Λ̄ > 1 is possible
and reported by :meth:`GDSSM.max_decay`); ``decay="negative"`` uses ``Λ = −exp(Λ_log)`` so that Λ̄ < 1 always.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from statelab.errors import ConfigError, StateMismatchError
from statelab.layers.protocol import Mixer, Segments, check_backend
from statelab.ops.diag_scan import diag_scan

__all__ = [
    "GDSSMConfig",
    "GDSSMState",
    "GDSSMLayer",
    "GDSSM",
    "ProductTokenSSM",
    "NonlinearGDSSMConfig",
    "NonlinearGDSSM",
    "make_windows",
]

Backend = Literal["chunk", "naive"]
BACKENDS: tuple[str, ...] = ("chunk", "naive")  # the first is the default


def make_windows(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token run that starts at a window boundary into complete windows and the pending tail.

    Args:
        seq: ``[B, T, d]`` tokens, the first at an even global position (an ``x`` token).
    Returns:
        ``windows: [B, W, 3, d]`` with ``W = max(0, (T - 1) // 2)`` and ``tail: [B, T - 2W, d]`` (the tokens of the
        incomplete window, which start the next call's run).
    """
    T = seq.shape[1]
    w = max(0, (T - 1) // 2)
    windows = torch.stack([seq[:, 0 : 2 * w : 2], seq[:, 1 : 2 * w : 2], seq[:, 2 : 2 * w + 1 : 2]], dim=2)
    return windows, seq[:, 2 * w :]


@dataclass(frozen=True, eq=False)
class GDSSMState:
    """State of a GD-SSM stack after ``n_tokens`` tokens.

    Why this is not a :class:`statelab.state.core.State` (and :class:`GDSSM` not a ``StatefulLM``): GD-SSM models
    are regressors over real-valued tokens, not language models over token ids. The ``StatefulLM`` contract is
    about ids (``input_ids [B, T]`` checked against a vocabulary, logits, ``score`` as log-probabilities,
    ``generate`` sampling tokens), none of which exists here; and the part of this state that is not per layer,
    ``tail`` (the raw input tokens of an incomplete window, whose count depends on the parity of ``n_tokens``),
    has no place in a ``State``'s per-layer ``[L, B, ...]`` parts. The value semantics are the same: a call never
    modifies the state it is given, ``clone`` copies, and continuation is exact (``tests/layers/test_gd_ssm.py``).

    Attributes:
        ssm: ``[L, B, P, d]``, the accumulator of every layer after the last complete window.
        tail: ``[B, n_tokens - 2·windows, d]``: tokens of the incomplete window (0 tokens only at the start).
        n_tokens: tokens consumed; window i completes at token 2i, so ``(n_tokens - 1) // 2`` windows are done.
    """

    ssm: torch.Tensor
    tail: torch.Tensor
    n_tokens: int

    def __post_init__(self) -> None:
        if self.ssm.dim() != 4 or self.tail.dim() != 3 or self.ssm.shape[1] != self.tail.shape[0]:
            raise StateMismatchError(
                f"GDSSMState needs ssm [L, B, P, d] and tail [B, t, d]; got {tuple(self.ssm.shape)}, "
                f"{tuple(self.tail.shape)}"
            )
        windows = max(0, (self.n_tokens - 1) // 2)
        if self.tail.shape[1] != self.n_tokens - 2 * windows:
            raise StateMismatchError(
                f"after {self.n_tokens} tokens the tail must hold {self.n_tokens - 2 * windows} tokens, "
                f"got {self.tail.shape[1]}"
            )

    def clone(self) -> GDSSMState:
        return GDSSMState(ssm=self.ssm.clone(), tail=self.tail.clone(), n_tokens=self.n_tokens)


@dataclass(frozen=True)
class GDSSMConfig:
    """GD-SSM stack.

    Attributes:
        d: token width (= state columns). state_rows: P, rows of each layer's state (default d).
        num_layers: L. decay: ``"real"`` or ``"negative"`` parametrisation of Λ (module docstring).
        chunk_size: windows per chunk of the fast path.
        init_scale: factor on the initial standard deviations of W_q and C (1 = the public code's).
    """

    d: int = 10
    state_rows: int | None = None
    num_layers: int = 1
    decay: Literal["real", "negative"] = "real"
    chunk_size: int = 16
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("d", "num_layers", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"GDSSMConfig.{name} must be a positive int, got {v!r}")
        if self.state_rows is not None and (not isinstance(self.state_rows, int) or self.state_rows < 1):
            raise ConfigError(f"GDSSMConfig.state_rows must be a positive int or None, got {self.state_rows!r}")
        if self.decay not in ("real", "negative"):
            raise ConfigError(f"GDSSMConfig.decay must be 'real' or 'negative', got {self.decay!r}")
        if not isinstance(self.init_scale, int | float) or self.init_scale < 0:
            raise ConfigError(f"GDSSMConfig.init_scale must be a number >= 0, got {self.init_scale!r}")

    @property
    def p(self) -> int:
        return self.d if self.state_rows is None else self.state_rows


class GDSSMLayer(nn.Module):
    """One GD-SSM layer: bilinear window input, diagonal recurrence, gated readout (module docstring).

    Parameters: ``w_q [3, 3]``, ``lam [P, d]`` (Λ, or Λ_log for ``decay="negative"``), ``log_step [d]``,
    ``C [d, P]``, ``D [3]``; 222 numbers for d = P = 10. Initialisation as the public code (W_q ~ N(0, 0.1²),
    Λ = −0.5, log Δ ~ U(log 1e−3, log 1e−1), D ~ N(0, 1)) with C LeCun-normal; ``init_scale`` multiplies the
    standard deviations of W_q and C.
    """

    def __init__(self, d: int, p: int, decay: str = "real", init_scale: float = 1.0) -> None:
        super().__init__()
        self.d, self.p, self.decay = d, p, decay
        self.w_q = nn.Parameter(torch.randn(3, 3) * 0.1 * init_scale)
        lam0 = -0.5 if decay == "real" else math.log(0.5)
        self.lam = nn.Parameter(torch.full((p, d), lam0))
        self.log_step = nn.Parameter(torch.empty(d).uniform_(math.log(1e-3), math.log(1e-1)))
        self.C = nn.Parameter(torch.randn(d, p) * init_scale / math.sqrt(p))
        self.D = nn.Parameter(torch.randn(3))

    def log_decay(self) -> torch.Tensor:
        """``log Λ̄ = Λ ⊙ Δ``: ``[P, d]``."""
        lam = self.lam if self.decay == "real" else -self.lam.exp()
        return lam * self.log_step.exp()[None, :]

    def inputs(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_iᵀ = Σ W_q[k,l] e_l e_kᵀ``: ``[B, W, P, d]`` (P = d), and the gate ``o_i = Σ D_k e_k``: ``[B, W, d]``."""
        a = torch.einsum("kl,bwlp,bwkq->bwpq", self.w_q, windows, windows)
        o = torch.einsum("k,bwkd->bwd", self.D, windows)
        return a, o

    def forward(
        self,
        windows: torch.Tensor,
        prev: torch.Tensor | None,
        state: torch.Tensor | None = None,
        backend: Backend = "chunk",
        chunk_size: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run one layer over complete windows.

        Args:
            windows: ``[B, W, 3, d]``. prev: ``[B, W, d]`` query-side vector of the layer below (None for the
                first layer). state: ``[B, P, d]`` accumulator before the first window (None: zeros).
        Returns:
            ``z: [B, W, d]`` (the layer's readout), ``a: [B, W, d]`` (``g + z``, passed up), the state after the
            last window ``[B, P, d]``.
        """
        if self.p != self.d:
            raise ConfigError("the bilinear window input needs state_rows == d")
        a_t, o = self.inputs(windows)
        g = o if prev is None else o + prev
        if state is not None and (state.shape[0] != a_t.shape[0] or tuple(state.shape[1:]) != tuple(a_t.shape[2:])):
            want = (a_t.shape[0], *a_t.shape[2:])
            raise StateMismatchError(f"initial state must be [B, P, d] = {want}, got {tuple(state.shape)}")
        scan = diag_scan(a_t, self.log_decay(), g, state, True, backend=backend, chunk_size=chunk_size)
        z = scan.y @ self.C.T
        return z, g + z, scan.final_state


class GDSSM(Mixer):
    """A stack of GD-SSM layers over interleaved regression tokens, with the state API.

    ``pred, new_state = model(tokens, state=None)``: ``tokens: [B, T, d]`` continue the sequence the state has
    consumed; ``pred: [B, W, d]`` holds ``−z^L`` for every window completed in this call (window i predicts the
    label of ``x_{i+1}``). The given state is never modified.

    ``backend``: the scan, ``"chunk"`` (parallel within chunks, default) or ``"naive"`` (the loop, faster for a
    handful of windows). Of the protocol's keywords (:mod:`statelab.layers.protocol`) it honours none: a
    :class:`GDSSMState` is not a per-layer record with positions.
    """

    BACKENDS = BACKENDS

    def __init__(self, config: GDSSMConfig, backend: Backend = "chunk") -> None:
        super().__init__(backend)
        self.config = config
        self.layers = nn.ModuleList(
            GDSSMLayer(config.d, config.p, config.decay, config.init_scale) for _ in range(config.num_layers)
        )

    def zero_state(self, batch_size: int, dtype: torch.dtype = torch.float32) -> GDSSMState:
        c = self.config
        dev = self.layers[0].w_q.device
        return GDSSMState(
            ssm=torch.zeros(c.num_layers, batch_size, c.p, c.d, dtype=dtype, device=dev),
            tail=torch.zeros(batch_size, 0, c.d, dtype=dtype, device=dev),
            n_tokens=0,
        )

    def check_state(self, state: GDSSMState, tokens: torch.Tensor) -> None:
        c = self.config
        want = (c.num_layers, tokens.shape[0], c.p, c.d)
        if tuple(state.ssm.shape) != want or state.tail.shape[2] != c.d:
            raise StateMismatchError(
                f"state ssm {tuple(state.ssm.shape)} / tail width {state.tail.shape[2]} do not fit this model "
                f"(expected ssm {want}, tail width {c.d})"
            )

    def forward(
        self,
        tokens: torch.Tensor,
        state: GDSSMState | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, GDSSMState]:
        self.refuse_unsupported(positions=positions, lengths=lengths, segments=segments)
        backend = self.backend
        if tokens.dim() != 3 or tokens.shape[2] != self.config.d:
            raise ConfigError(f"tokens must be [B, T, {self.config.d}], got {tuple(tokens.shape)}")
        if state is None:
            state = self.zero_state(tokens.shape[0], tokens.dtype)
        self.check_state(state, tokens)
        windows, tail = make_windows(torch.cat([state.tail, tokens], dim=1))
        prev = None
        finals = []
        z = windows.new_zeros(windows.shape[0], windows.shape[1], self.config.d)
        for i, layer in enumerate(self.layers):
            z, prev, s = layer(windows, prev, state.ssm[i], backend, self.config.chunk_size)
            finals.append(s)
        new_state = GDSSMState(ssm=torch.stack(finals), tail=tail.clone(), n_tokens=state.n_tokens + tokens.shape[1])
        return -z, new_state

    def max_decay(self) -> float:
        """Largest Λ̄ over all layers (above 1 means a growing accumulator)."""
        return max(float(layer.log_decay().detach().exp().max()) for layer in self.layers)

    @classmethod
    def from_gd(
        cls,
        eta: float,
        n_examples: int,
        d: int,
        steps: int = 1,
        discount: float = 1.0,
        chunk_size: int = 16,
        dtype: torch.dtype = torch.float32,
        backend: Backend = "chunk",
    ) -> GDSSM:
        """The exact construction: ``steps`` layers computing ``steps``-step GD with learning rate ``eta``.

        ``W_q = e₁e₁ᵀ`` (layers 1..k-1, accumulating ``Σ x xᵀ``) or ``e₁e₂ᵀ`` (layer k, ``Σ y xᵀ``); ``Λ̄ = discount``
        (1: plain GD; < 1: exponentially discounted examples); ``C = −(η/N) I`` (η/N, not the public code's η/P);
        ``D = e₃``. At window i the prediction is GD with a step of η/N per example on the first i examples, so
        the last window (the query) equals k-step GD exactly. Parameters are set in ``dtype`` (η/N is not exact in
        fp32, so build an fp64 model directly rather than casting an fp32 one).
        """
        if not 0 < discount <= 1:
            raise ConfigError(f"discount must be in (0, 1], got {discount}")
        model = cls(GDSSMConfig(d=d, num_layers=steps, decay="real", chunk_size=chunk_size), backend).to(dtype)
        c = eta / n_examples
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                layer.w_q.zero_()
                layer.w_q[0, 1 if i == steps - 1 else 0] = 1.0
                layer.log_step.zero_()
                layer.lam.fill_(math.log(discount))
                layer.C.copy_(-c * torch.eye(d, dtype=torch.float64))
                layer.D.copy_(torch.tensor([0.0, 0.0, 1.0]))
        return model


class ProductTokenSSM(Mixer):
    """Diagonal SSM on constructed tokens ``u_i = [x_i y_i; x_{i+1}]`` (scalar y) with a gated readout.

    ``s_i = Λ̄ ⊙ s_{i-1} + B̄ u_i`` (``s: [B, P]``), ``o_i = s_iᵀ (D u_i)``, prediction ``−o_i``. The product
    ``x_i y_i`` is in the input, so output gating alone suffices (``constructed-token`` branch of the public code).
    ``pred, new_state = model(u, state=None)`` with ``u: [B, W, 2d]``, ``pred: [B, W]``, state ``[B, P]`` after the
    last token.
    """

    BACKENDS = BACKENDS

    def __init__(self, d: int, p: int | None = None, backend: Backend = "chunk") -> None:
        super().__init__(backend)
        p = d if p is None else p
        self.d, self.p = d, p
        self.log_decay = nn.Parameter(torch.full((p,), -0.05))
        self.B = nn.Parameter(torch.randn(p, 2 * d) / math.sqrt(2 * d))
        self.D = nn.Parameter(torch.randn(p, 2 * d) / math.sqrt(2 * d))

    def forward(
        self,
        u: torch.Tensor,
        state: torch.Tensor | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.refuse_unsupported(positions=positions, lengths=lengths, segments=segments)
        if u.dim() != 3 or u.shape[2] != 2 * self.d:
            raise ConfigError(f"constructed tokens must be [B, W, {2 * self.d}], got {tuple(u.shape)}")
        if state is not None and tuple(state.shape) != (u.shape[0], self.p):
            raise StateMismatchError(f"state must be [B, P] = {(u.shape[0], self.p)}, got {tuple(state.shape)}")
        b = (u @ self.B.T)[..., None]  # [B, W, P, 1]
        ones = u.new_ones(u.shape[0], u.shape[1], 1)
        s0 = None if state is None else state[..., None]
        scan = diag_scan(b, self.log_decay[:, None], ones, s0, True, backend=self.backend)  # h_i = s_i
        out = (scan.y * (u @ self.D.T)).sum(-1)
        return -out, scan.final_state[..., 0]

    @classmethod
    def from_gd(
        cls, eta: float, n_examples: int, d: int, dtype: torch.dtype = torch.float32, backend: Backend = "chunk"
    ) -> ProductTokenSSM:
        """``Λ̄ = 1``, ``B̄ = −(η/N)[I 0]``, ``D = [0 I]``: the prediction is one GD step on every prefix."""
        model = cls(d, backend=backend).to(dtype)
        with torch.no_grad():
            model.log_decay.zero_()
            eye = torch.eye(d, dtype=torch.float64)
            model.B.copy_(torch.cat([-(eta / n_examples) * eye, torch.zeros(d, d, dtype=torch.float64)], dim=1))
            model.D.copy_(torch.cat([torch.zeros(d, d), torch.eye(d)], dim=1))
        return model


@dataclass(frozen=True)
class NonlinearGDSSMConfig:
    """GD-SSM with a learned token embedding and read-out (the non-linear extension of arXiv 2410.11687).

    Attributes:
        d_in: raw token width. d_out: target width E. width: P, the GD-SSM token width.
        embed: ``"affine"``: one affine map for every token (public code); ``"mlp"``: an MLP φ on x tokens and an
            affine map on y tokens (von Oswald's input MLP; GD then runs on the features φ(x)).
        head: ``"linear"``: Dense(E); ``"gated_mlp"``: ``h ⊙ σ(Dense(GELU(h)))`` then Dense(E) (public code).
        num_layers, hidden: GD-SSM layers and the MLP hidden width.
    """

    d_in: int = 1
    d_out: int = 1
    width: int = 10
    embed: Literal["affine", "mlp"] = "affine"
    head: Literal["linear", "gated_mlp"] = "gated_mlp"
    num_layers: int = 1
    hidden: int = 40

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "width", "num_layers", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"NonlinearGDSSMConfig.{name} must be a positive int, got {v!r}")
        if self.embed not in ("affine", "mlp") or self.head not in ("linear", "gated_mlp"):
            raise ConfigError(f"embed must be affine|mlp and head linear|gated_mlp, got {self.embed!r}, {self.head!r}")


class NonlinearGDSSM(nn.Module):
    """Embedding → GD-SSM stack → head. ``pred, state = model(tokens [B, T, d_in], state)``; ``pred: [B, W, E]``.

    Whether a token is an x or a y follows from its global position (even: x), which the state records.
    """

    def __init__(self, config: NonlinearGDSSMConfig, backend: Backend = "chunk") -> None:
        super().__init__()
        check_backend("NonlinearGDSSM", backend, BACKENDS)
        self.config = config
        c = config
        self.embed_y = nn.Linear(c.d_in, c.width)
        if c.embed == "mlp":
            self.embed_x: nn.Module = nn.Sequential(
                nn.Linear(c.d_in, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.width)
            )
        else:
            self.embed_x = self.embed_y
        self.core = GDSSM(GDSSMConfig(d=c.width, num_layers=c.num_layers), backend)
        if c.head == "gated_mlp":
            self.gate = nn.Linear(c.width, c.width)
        self.out = nn.Linear(c.width, c.d_out)

    def zero_state(self, batch_size: int, dtype: torch.dtype = torch.float32) -> GDSSMState:
        return self.core.zero_state(batch_size, dtype)

    @property
    def backend(self) -> str:
        """The scan of the GD-SSM core (``"chunk"`` or ``"naive"``)."""
        return self.core.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.core.backend = value

    def forward(
        self,
        tokens: torch.Tensor,
        state: GDSSMState | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, GDSSMState]:
        self.core.refuse_unsupported(positions=positions, lengths=lengths, segments=segments)
        if tokens.dim() != 3 or tokens.shape[2] != self.config.d_in:
            raise ConfigError(f"tokens must be [B, T, {self.config.d_in}], got {tuple(tokens.shape)}")
        start = 0 if state is None else state.n_tokens
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        is_x = (pos % 2 == 0)[None, :, None]
        h = torch.where(is_x, self.embed_x(tokens), self.embed_y(tokens))
        z, new_state = self.core(h, state)
        if self.config.head == "gated_mlp":
            z = z * torch.sigmoid(self.gate(F.gelu(z)))
        return self.out(z), new_state
