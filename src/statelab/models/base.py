"""What every statelab language model shares: the state contract, fingerprints, generation and scoring.

A concrete model (Mamba-1, Mamba-2) implements three things:

* ``_run(input_ids, state, positions, with_head) -> RunOutput``: one pass over ``input_ids [B, T]`` starting from
  ``state`` (``None`` = zeros), returning logits (or ``None`` when ``with_head`` is false, which is how encoding
  skips the output head), the state after the last token and, if ``positions`` is given, the states after each
  of those positions, all from that single pass;
* ``zero_state(batch_size, dtype=None, device=None) -> State``;
* ``decay_A() -> Tensor``: ``A = -exp(A_log)`` of every layer, stacked, fp32 (``[L, D, N]`` or ``[L, H]``).

Everything else (``forward``, ``encode``, ``generate``, ``score``, fingerprints, state checks, assembling the
per-layer mixer states of a pass into ``State`` values) lives here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from statelab.errors import StateMismatchError
from statelab.state.core import State

__all__ = ["StatefulLM", "LayerState", "RunOutput", "ScoreResult", "fingerprint_module"]


class LayerState(Protocol):
    """One layer's mixer state after some token (e.g. ``Mamba1`` ``MixerState``, ``Mamba2LayerState``).

    ``conv [B, C, K - 1]``, ``ssm [B, ...]`` (``[B, D, N]`` or ``[B, H, P, N]``), ``sum_delta [B, D|H]``.
    """

    @property
    def conv(self) -> torch.Tensor: ...

    @property
    def ssm(self) -> torch.Tensor: ...

    @property
    def sum_delta(self) -> torch.Tensor: ...


@dataclass
class RunOutput:
    """Result of one pass: ``logits [B, T, V]`` or ``None``, the final state, and states at ``positions``."""

    logits: torch.Tensor | None
    state: State
    states_at: list[State] | None = None


@dataclass
class ScoreResult:
    """Per-token log-probabilities of a scored sequence.

    Attributes:
        logprobs: ``[B, T - 1]``, log p(token t | tokens < t, initial state) for t = 1..T-1. Token 0 has no
            prediction: a state does not carry the logits of the token before it.
        perplexity: ``[B]``, ``exp(-mean(logprobs))``.
        state: the state after all ``T`` tokens.
    """

    logprobs: torch.Tensor
    perplexity: torch.Tensor
    state: State


def fingerprint_module(config: dict[str, Any], module: nn.Module) -> str:
    """SHA-256 over the canonical JSON of ``config`` and the bytes, names, shapes and dtypes of all tensors."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class StatefulLM(nn.Module):
    """Base class of statelab language models: ``logits, state = model(input_ids, state=None)``."""

    arch: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self._fp_cache: tuple[tuple, str] | None = None

    # ---- to implement --------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The model config as a JSON-able dict (part of the fingerprint)."""
        raise NotImplementedError

    def _run(
        self,
        input_ids: torch.Tensor,
        state: State | None,
        positions: Sequence[int] | None,
        with_head: bool,
    ) -> RunOutput:
        raise NotImplementedError

    def zero_state(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> State:
        raise NotImplementedError

    def decay_A(self) -> torch.Tensor:
        raise NotImplementedError

    # ---- identity ------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Hash of config and weights. Recomputed only when a parameter was modified (tracked by version)."""
        key = tuple((n, t.data_ptr(), t._version) for n, t in self.state_dict(keep_vars=True).items())
        if self._fp_cache is None or self._fp_cache[0] != key:
            self._fp_cache = (key, fingerprint_module(self.config_dict(), self))
        return self._fp_cache[1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the input embedding)."""
        return next(self.parameters()).dtype

    def check_state(self, state: State, batch_size: int | None = None) -> None:
        """Raise ``StateMismatchError`` unless ``state`` was made by this model, has the dtype this model makes its
        states in (``zero_state``'s default: the model dtype for Mamba-1, fp32 for Mamba-2) and fits the batch."""
        if not isinstance(state, State):
            raise StateMismatchError(f"state must be a statelab.State, got {type(state).__name__}")
        if state.arch != self.arch:
            raise StateMismatchError(f"this is a {self.arch} model but the state is from a {state.arch} model")
        ref = self.zero_state(1, device="meta")
        if state.layout != ref.layout or state.num_layers != ref.num_layers:
            raise StateMismatchError(
                f"state layout L={state.num_layers} {state.layout} does not fit this model "
                f"(L={ref.num_layers} {ref.layout})"
            )
        if state.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"state was made by model {state.fingerprint[:16]}, not by this model {self.fingerprint[:16]}"
            )
        # one dtype per model: the one its own states come in (what zero_state gives by default), so that a pass
        # never silently changes the precision of the state it continues from
        if state.dtype != ref.dtype:
            raise StateMismatchError(
                f"state dtype {state.dtype} differs from the {ref.dtype} this {self.arch} model keeps its states in; "
                f"use state.to(dtype={ref.dtype})"
            )
        if batch_size is not None and state.batch_size != batch_size:
            raise StateMismatchError(
                f"state has batch size {state.batch_size} but input has {batch_size}; "
                "use state.expand(n) or state.select(rows)"
            )

    def _assemble_states(
        self,
        final: Sequence[LayerState],
        at: Sequence[Sequence[LayerState]],
        positions: Sequence[int] | None,
        n_before: int,
        n_new: int,
        dtype: torch.dtype,
        ssm: torch.Tensor | None = None,
    ) -> tuple[State, list[State] | None]:
        """The model states of one pass from its per-layer mixer states (shared by every ``_run``).

        Args:
            final: per layer ``i``, its state after the last of the ``n_new`` tokens.
            at: ``at[i][k]``: layer ``i``'s state after ``positions[k]`` (read only when ``positions`` is given).
            positions: 1-based counts of tokens of this pass, or ``None``.
            n_before: tokens consumed before this pass (the input state's ``n_tokens``, 0 without one).
            n_new: ``T``, the tokens of this pass.
            dtype: the dtype of ``ssm`` and ``conv`` in the returned states (the model's state dtype).
            ssm: ``[L, B, ...]``, the SSM parts of ``final`` already stacked (a model that writes them into one
                buffer); replaces stacking ``final``.

        Returns:
            ``(state after token n_before + n_new, [state after token n_before + p for p in positions] or None)``,
            each stacked over layers ``[L, B, ...]``, with ``ssm``/``conv`` in ``dtype`` and ``sum_delta`` fp32.
        """
        fp = self.fingerprint

        def stack(parts: Sequence[LayerState], n_tokens: int, ssm_all: torch.Tensor | None = None) -> State:
            return State(
                arch=self.arch,
                ssm=(torch.stack([p.ssm for p in parts]) if ssm_all is None else ssm_all).to(dtype),
                conv=torch.stack([p.conv for p in parts]).to(dtype),
                sum_delta=torch.stack([p.sum_delta for p in parts]).float(),
                n_tokens=n_tokens,
                fingerprint=fp,
            )

        new_state = stack(final, n_before + n_new, ssm)
        if positions is None:
            return new_state, None
        assert len(at) == len(final)
        return new_state, [stack([a[k] for a in at], n_before + p) for k, p in enumerate(positions)]

    def check_input(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor [B, T], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")

    # ---- the state API -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``input_ids [B, T]`` from ``state`` (after token ``state.n_tokens``) -> ``(logits [B, T, V], state)``.

        The returned state is after the last input token. ``state`` is not modified.
        """
        out = self._run(input_ids, state, None, True)
        return out.logits, out.state

    @torch.no_grad()
    def encode(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        positions: Sequence[int] | None = None,
        conv_context: torch.Tensor | None = None,
    ) -> State | list[State]:
        """The state after ``input_ids`` (no output head is computed), or a list of states after each of
        ``positions`` (1-based counts of tokens of this call: position ``t`` means "after ``input_ids[:, :t]``"),
        all from one pass.

        ``conv_context [B, Tc]``: the tokens just before this chunk (at least ``K - 1`` of them; e.g. the last
        tokens of the previous chunk). They are read from zero only to fill the conv windows; then the SSM state
        and ΣΔ are reset to zero and the token count to 0, so the result describes the chunk alone (``n_tokens``
        and ``sum_delta`` count only ``input_ids``) but sees the true left context through the conv. For one
        layer, ordered composition of such chunk states equals the state of the concatenation exactly (State
        Soup, arXiv 2406.08423, §2.4). Cannot be combined with ``state``.
        """
        if conv_context is not None:
            if state is not None:
                raise ValueError("encode takes either state or conv_context, not both")
            self.check_input(conv_context)
            if conv_context.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"conv_context has batch size {conv_context.shape[0]} but input_ids has {input_ids.shape[0]}"
                )
            if conv_context.shape[1] > 0:
                ctx = self._run(conv_context, None, None, False).state
                state = ctx.replace(
                    ssm=torch.zeros_like(ctx.ssm), sum_delta=torch.zeros_like(ctx.sum_delta), n_tokens=0
                )
        if positions is not None:
            pos = [int(p) for p in positions]
            T = input_ids.shape[1]
            if any(p < 1 or p > T for p in pos):
                raise ValueError(f"positions must lie in [1, {T}], got {pos}")
            out = self._run(input_ids, state, pos, False)
            assert out.states_at is not None
            return out.states_at
        return self._run(input_ids, state, None, False).state

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, state: State | None = None) -> ScoreResult:
        """Log-probabilities of ``input_ids[:, 1:]`` given what precedes them (and ``state``)."""
        self.check_input(input_ids)
        if input_ids.shape[1] < 2:
            raise ValueError("score needs at least 2 tokens: the first one has no prediction")
        logits, new_state = self(input_ids, state)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        lp = logp.gather(-1, input_ids[:, 1:].long().unsqueeze(-1)).squeeze(-1)
        return ScoreResult(logprobs=lp, perplexity=torch.exp(-lp.mean(dim=1)), state=new_state)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        state: State | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Generate up to ``max_new_tokens`` after ``input_ids [B, T]`` (``T >= 1``), starting from ``state``.

        Greedy when ``temperature == 0``; otherwise samples with a local generator seeded by ``seed``, after
        top-k and nucleus (top-p) filtering. A row that produced ``eos_token_id`` keeps emitting it; generation
        stops early when every row has. Returns ``(tokens [B, n], state)`` where ``tokens`` are only the new
        tokens and ``state`` is after the prompt and all ``n`` new tokens, so a later call continues exactly.
        """
        self.check_input(input_ids)
        if input_ids.shape[1] < 1:
            raise ValueError("generate needs at least one input token to predict the next one from")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        B = input_ids.shape[0]
        logits, state = self(input_ids, state)
        next_logits = logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            tok = _pick(next_logits.float(), temperature, top_k, top_p, gen)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done = done | (tok == eos_token_id)
            out.append(tok)
            logits, state = self(tok[:, None], state)
            next_logits = logits[:, -1]
            if eos_token_id is not None and bool(done.all()):
                break
        if not out:
            return torch.empty(B, 0, dtype=torch.long, device=input_ids.device), state
        return torch.stack(out, dim=1), state


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row from ``logits [B, V]``: argmax at temperature 0, else filtered sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
