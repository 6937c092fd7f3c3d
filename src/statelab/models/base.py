"""What every statelab language model shares: the state contract, fingerprints, generation and scoring.

A concrete model (Mamba-1, Mamba-2, the Birdie stacks) implements three things:

* ``_run(input_ids, state, positions, with_head, lengths) -> RunOutput``: one pass over ``input_ids [B, T]``
  starting from ``state`` (``None`` = zeros), returning logits (or ``None`` when ``with_head`` is false, which is
  how encoding skips the output head), the state after the last token and, if ``positions`` is given, the states
  after each of those positions, all from that single pass. ``lengths [B]`` (or ``None`` = every row is full)
  says how many leading tokens of each row are real (right padding, ``0 <= lengths[b] <= T``): the state of row
  ``b`` is after its ``lengths[b]`` real tokens, exactly as if the row had been run alone (its logits at padded
  positions are left unspecified here; the public calls zero them). A row of length 0 reads nothing (generation
  uses that for rows that have stopped);
* ``zero_state(batch_size, dtype=None, device=None) -> State``;
* ``decay_A() -> Tensor``: ``A = -exp(A_log)`` of every layer, stacked, fp32 (``[L, D, N]`` or ``[L, H]``).

Everything else (``forward``, ``encode``, ``generate``, ``score``, fingerprints, state checks, assembling the
per-layer mixer states of a pass into ``State`` values, and turning ``lengths`` / ``attention_mask`` into right
padding) lives here.

**Ragged batches.** Every call takes ``lengths [B]`` (right padding: row ``b`` is ``input_ids[b, :lengths[b]]``)
or ``attention_mask [B, T]`` (transformers' convention: 1 for a real token, 0 for padding; the ones of a row must
be contiguous, so left padding, right padding or both). A left-padded batch is moved to right padding before the
pass and the logits moved back, so both layouts run the same exact path. How padding is kept out of the state:
at a padded position Δ = 0, so ``exp(ΔA) = 1`` and ``ΔB·x = 0`` leave the SSM state and ΣΔ unchanged, and each
row's conv state is taken from its own last ``K - 1`` real inputs. A row of a padded batch therefore gives the
state and, at its real positions, the logits it gives alone (equal up to fp32 round-off: the projections run as
one matrix product over the whole batch, whose blocking may differ from a single row's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from statelab.errors import StateMismatchError
from statelab.layers.decode import Matvec, cached_plan, matvec, transposed_layout
from statelab.state.core import State
from statelab.state.io import _all_finite

__all__ = [
    "StatefulLM",
    "LayerState",
    "RunOutput",
    "ScoreResult",
    "Generation",
    "RaggedBatch",
    "fingerprint_module",
    "empty_like_state",
    "advanced_state",
    "StepPlan",
    "step_buffers",
    "HFExport",
]


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
    """Per-token log-probabilities of scored sequences.

    Attributes:
        logprobs: ``[B, T - 1]``, log p(token t | tokens < t, initial state) for t = 1..T-1, in the layout of the
            input (left or right padded). Token 0 of a row has no prediction: a state does not carry the logits of
            the token before it. Entries that are not a real prediction (``mask`` false) are 0.
        perplexity: ``[B]``, ``exp(-mean(logprobs))`` over each row's real predictions.
        state: the state after each row's real tokens.
        mask: ``[B, T - 1]`` bool, true where ``logprobs`` holds a real prediction (both tokens real).
    """

    logprobs: torch.Tensor
    perplexity: torch.Tensor
    state: State
    mask: torch.Tensor


class Generation(NamedTuple):
    """What ``generate`` returns.

    Attributes:
        tokens: ``[B, n]`` new tokens. A row that produced ``eos_token_id`` is filled with it after its end.
        state: each row's state after its prompt and its own ``lengths[b]`` new tokens (the EOS included).
        lengths: ``[B]`` int64, how many new tokens each row produced (up to and including its EOS).
    """

    tokens: torch.Tensor
    state: State
    lengths: torch.Tensor


@dataclass(frozen=True)
class RaggedBatch:
    """A batch in right-padded form, with what is needed to put outputs back in the caller's layout.

    Attributes:
        ids: ``[B, T]`` right-padded input ids (row ``b``'s real tokens are ``ids[b, :lengths[b]]``).
        lengths: ``[B]`` int64 on the ids' device, or ``None`` when every row is full (no padding at all).
        starts: ``[B]`` int64, where each row's real tokens began in the caller's layout (left padding), or
            ``None`` when the caller's layout was already right-padded.
    """

    ids: torch.Tensor
    lengths: torch.Tensor | None
    starts: torch.Tensor | None

    def valid(self) -> torch.Tensor:
        """``[B, T]`` bool in right-padded form: true at real tokens."""
        B, T = self.ids.shape
        if self.lengths is None:
            return torch.ones(B, T, dtype=torch.bool, device=self.ids.device)
        return torch.arange(T, device=self.ids.device) < self.lengths[:, None]

    def row_lengths(self) -> list[int]:
        B, T = self.ids.shape
        return [T] * B if self.lengths is None else self.lengths.tolist()

    def to_caller(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, ...]`` in right-padded form -> the caller's layout, zeros at padded positions."""
        if self.lengths is not None:
            valid = self.valid()
            keep = valid.view(*valid.shape, *([1] * (x.dim() - 2)))
            x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.starts is None:
            return x
        T = x.shape[1]
        src = torch.arange(T, device=x.device)[None, :] - self.starts[:, None]  # caller position t <- row index
        inside = (src >= 0) & (src < self.lengths[:, None])
        idx = src.clamp(0, T - 1).view(*src.shape, *([1] * (x.dim() - 2))).expand_as(x)
        out = x.gather(1, idx)
        keep = inside.view(*inside.shape, *([1] * (x.dim() - 2)))
        return torch.where(keep, out, torch.zeros((), dtype=x.dtype, device=x.device))


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

    def config_dict(self) -> dict[str, Any]:
        """The model config as a JSON-able dict (part of the fingerprint)."""
        raise NotImplementedError

    def _run(
        self,
        input_ids: torch.Tensor,
        state: State | None,
        positions: Sequence[int] | None,
        with_head: bool,
        lengths: torch.Tensor | None = None,
    ) -> RunOutput:
        raise NotImplementedError

    def _step(
        self, tokens: torch.Tensor, state: State, active: torch.Tensor | None, out: State | None
    ) -> tuple[torch.Tensor, State]:
        """One token per row: ``tokens [B]`` from ``state`` -> ``(logits [B, V], state after it)``.

        ``active [B]`` bool (``None`` = every row): an inactive row reads nothing, its state stays as it was (its
        logits are unspecified). ``out``: ``None``, or a state of the same shape whose tensors the new state may be
        written into (they must not overlap ``state``'s; ``state`` itself is never written). No checks: callers
        pass states this model made. This default runs ``_run`` on one token; models override it with a decode
        path that equals it to fp32 round-off.
        """
        lengths = None if active is None else active.long()
        run = self._run(tokens[:, None], state, None, True, lengths)
        assert run.logits is not None
        return run.logits[:, -1], run.state

    def zero_state(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> State:
        raise NotImplementedError

    def decay_A(self) -> torch.Tensor:
        raise NotImplementedError

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
        states in (``zero_state``'s default: the model dtype for Mamba-1, fp32 for Mamba-2), fits the batch and
        holds no NaN or inf.

        **dtype.** The fingerprint covers the weights as they are, dtype included, so the same checkpoint loaded
        in another dtype is another model: a state made by it is refused, and the message says so (the checkpoint
        and the dtype it was made in) and names both fixes: load the model in that dtype (exact), or take the state
        over explicitly with :meth:`adopt_state` (cast to this model's state dtype; continuing from it is then as
        exact as this model's own precision). A state of this model in the wrong dtype is refused with
        ``state.to(dtype)`` as the fix. Nothing is cast silently.

        **Values.** One ``isfinite`` reduction of ``ssm`` and of ``conv`` (a few percent of a one-token step of a
        small model): a NaN/inf state would otherwise run on into NaN logits, greedy tokens of 0 and a perplexity
        of NaN. ``sum_delta`` may be NaN ("unknown", see :mod:`statelab.state.interop`).
        """
        if not isinstance(state, State):
            raise StateMismatchError(f"state must be a statelab.State, got {type(state).__name__}")
        if state.arch != self.arch:
            raise StateMismatchError(f"this is a {self.arch} model but the state is from a {state.arch} model")
        ref = self.zero_state(1, device="meta")
        if state.layout_key != ref.layout_key or state.num_layers != ref.num_layers:
            raise StateMismatchError(
                f"state layout L={state.num_layers} {state.layout} does not fit this model "
                f"(L={ref.num_layers} {ref.layout})"
            )
        if state.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"state was made by model {state.fingerprint[:16]}, not by this model {self.fingerprint[:16]}"
                + self.fingerprint_hint(state.fingerprint)
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
        # ΣΔ is not checked: it never reaches the logits, and NaN there means "unknown" (a state imported from a
        # transformers cache); ordered composition, which needs it, refuses it itself
        bad = [p for p in ("ssm", "conv") if not _all_finite(getattr(state, p))]
        if bad:
            raise StateMismatchError(
                f"state part(s) {bad} hold NaN/inf values; a model cannot continue from them (a mix with extreme "
                "weights or a diverged computation made them); recompute the state"
            )

    def fingerprint_hint(self, fingerprint: str) -> str:
        """Why a state of model ``fingerprint`` is not this model's, when the reason is dtype; else ``""``.

        Recognises the checkpoint this model was loaded from (``load_model``) loaded in float32, bfloat16 or
        float16. Reloads that checkpoint once per dtype, on this error path only (cached).
        """
        dtype = self.sibling_dtype(fingerprint)
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            return (
                f"; it was made by this same checkpoint loaded in {name} (this model runs in "
                f"{str(self.dtype).removeprefix('torch.')}): load the model with dtype=torch.{name} to continue from "
                "it exactly, or take it over explicitly with model.adopt_state(state)"
            )
        return ""

    def sibling_dtype(self, fingerprint: str) -> torch.dtype | None:
        """The dtype in which the checkpoint this model was loaded from has fingerprint ``fingerprint``, or None
        (unknown checkpoint, or a model not loaded from a directory)."""
        source = getattr(self, "_source_dir", None)
        if source is None:
            return None
        cache = self.__dict__.setdefault("_sibling_fps", {})
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if dtype == self.dtype:
                continue
            if dtype not in cache:
                from statelab.models.loading import load_model

                try:
                    cache[dtype] = load_model(source, dtype=dtype).fingerprint
                except Exception:  # noqa: BLE001  (the checkpoint changed or vanished: no hint, the refusal stands)
                    cache[dtype] = None
            if cache[dtype] == fingerprint:
                return dtype
        return None

    def adopt_state(self, state: State) -> State:
        """``state`` as a state of this model: cast to this model's state dtype and stamped with its fingerprint.

        Only for a state of this model or of the same checkpoint loaded in another dtype (see
        :meth:`check_state`); anything else is a ``StateMismatchError``. This is the explicit step that lets a
        bfloat16 model continue from a float32 state of its checkpoint (the result is exact up to this model's
        own precision). Returns a new state; ``state`` is unchanged.
        """
        if not isinstance(state, State):
            raise StateMismatchError(f"state must be a statelab.State, got {type(state).__name__}")
        if state.fingerprint != self.fingerprint and self.sibling_dtype(state.fingerprint) is None:
            raise StateMismatchError(
                f"cannot adopt a state of model {state.fingerprint[:16]}: it was not made by this model "
                f"{self.fingerprint[:16]} nor by its checkpoint in another dtype"
            )
        ref = self.zero_state(1, device="meta")
        adopted = state.to(dtype=ref.dtype).replace(fingerprint=self.fingerprint)
        self.check_state(adopted)
        return adopted

    def _assemble_states(
        self,
        final: Sequence[LayerState],
        at: Sequence[Sequence[LayerState]],
        positions: Sequence[int] | None,
        n_before: Sequence[int],
        n_new: Sequence[int],
        dtype: torch.dtype,
        ssm: torch.Tensor | None = None,
    ) -> tuple[State, list[State] | None]:
        """The model states of one pass from its per-layer mixer states (shared by every ``_run``).

        Args:
            final: per layer ``i``, its state after each row's last real token.
            at: ``at[i][k]``: layer ``i``'s state after ``positions[k]`` (read only when ``positions`` is given).
            positions: 1-based counts of tokens of this pass (the same for every row), or ``None``.
            n_before: per row, the tokens consumed before this pass (the input state's ``tokens``).
            n_new: per row, the real tokens of this pass (``T`` for every row without padding).
            dtype: the dtype of ``ssm`` and ``conv`` in the returned states (the model's state dtype).
            ssm: ``[L, B, ...]``, the SSM parts of ``final`` already stacked (a model that writes them into one
                buffer); replaces stacking ``final``.

        Returns:
            ``(state after each row's tokens, [state after token n_before + p for p in positions] or None)``,
            each stacked over layers ``[L, B, ...]``, with ``ssm``/``conv`` in ``dtype`` and ``sum_delta`` fp32.
        """
        fp = self.fingerprint

        def stack(parts: Sequence[LayerState], counts: tuple[int, ...], ssm_all: torch.Tensor | None = None) -> State:
            return State(
                arch=self.arch,
                ssm=(torch.stack([p.ssm for p in parts]) if ssm_all is None else ssm_all).to(dtype),
                conv=torch.stack([p.conv for p in parts]).to(dtype),
                sum_delta=torch.stack([p.sum_delta for p in parts]).float(),
                n_tokens=counts,
                fingerprint=fp,
            )

        new_state = stack(final, tuple(a + b for a, b in zip(n_before, n_new, strict=True)), ssm)
        if positions is None:
            return new_state, None
        assert len(at) == len(final)
        return new_state, [stack([a[k] for a in at], tuple(n + p for n in n_before)) for k, p in enumerate(positions)]

    def _ragged(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor | Sequence[int] | None,
        attention_mask: torch.Tensor | None,
    ) -> RaggedBatch:
        """Check ``lengths`` / ``attention_mask`` against ``input_ids [B, T]`` and move the batch to right padding.

        Raises ``ValueError`` naming the fix for: both given, lengths of the wrong shape or outside ``[1, T]``, a
        mask whose shape differs from the ids', a mask with values other than 0/1, a row with no real token, or a
        row whose ones are not contiguous.
        """
        self.check_input(input_ids)
        B, T = input_ids.shape
        dev = input_ids.device
        if lengths is not None and attention_mask is not None:
            raise ValueError("give lengths (right padding) or attention_mask (any padding), not both")
        if lengths is not None:
            lt = _as_lengths(lengths, B, T)
            if bool((lt == T).all()):
                return RaggedBatch(input_ids, None, None)
            return RaggedBatch(input_ids, lt.to(dev), None)
        if attention_mask is None:
            return RaggedBatch(input_ids, None, None)
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor [B, T], got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {(B, T)}; "
                "they must have the same shape"
            )
        m = attention_mask.to(device=dev)
        if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1 (1 = real token, 0 = padding)")
        m = m.to(torch.bool)
        lt = m.sum(1)
        if bool((lt == 0).any()):
            rows = (lt == 0).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask rows {rows[:5]} have no real token; every row needs at least one")
        starts = m.to(torch.int8).argmax(1)  # first 1 of each row
        ar = torch.arange(T, device=dev)
        want = (ar >= starts[:, None]) & (ar < (starts + lt)[:, None])
        if not bool(torch.equal(want, m)):
            rows = (want != m).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"attention_mask rows {rows[:5]} are not contiguous: the ones of a row must form one block "
                "(left or right padding)"
            )
        if bool((starts == 0).all()):
            if bool((lt == T).all()):
                return RaggedBatch(input_ids, None, None)
            return RaggedBatch(input_ids, lt, None)
        src = (ar[None, :] + starts[:, None]).clamp(max=T - 1)
        return RaggedBatch(input_ids.gather(1, src), lt, starts)

    def check_input(self, input_ids: torch.Tensor) -> None:
        """Raise unless ``input_ids`` is an integer tensor ``[B, T]`` of ids in the embedding's range ``[0, V)``."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor [B, T], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        emb = getattr(self, "embedding", None)
        if isinstance(emb, nn.Embedding) and input_ids.numel():
            V = emb.num_embeddings
            if bool(((input_ids < 0) | (input_ids >= V)).any()):  # one sync; details only on failure
                lo, hi = int(input_ids.min()), int(input_ids.max())
                raise ValueError(
                    f"token ids must lie in [0, {V}) (this model's vocabulary has {V} entries), got ids from {lo} "
                    f"to {hi}; were they made by another tokenizer?"
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """``input_ids [B, T]`` from ``state`` -> ``(logits [B, T, V], state)``.

        Row ``b`` continues from its own count ``state.tokens[b]``. With ``lengths [B]`` (right padding) or
        ``attention_mask [B, T]`` (left or right padding, contiguous ones), the returned state holds each row after
        its own real tokens, and the logits at real positions equal those of the row run alone; logits at padded
        positions are zero. ``state`` is not modified.
        """
        batch = self._ragged(input_ids, lengths, attention_mask)
        out = self._run(batch.ids, state, None, True, batch.lengths)
        assert out.logits is not None
        return batch.to_caller(out.logits), out.state

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Decode one token per row: ``tokens [B]`` (int) from ``state`` (``None`` = zeros) ->
        ``(logits [B, V], state after it)``.

        Equals ``forward(tokens[:, None], state)`` (its logits at the one position) to fp32 round-off, through the
        model's decode path: no autograd, preallocated per-layer work and, on CPUs, matrices in the layout that
        is fast for a few rows (:mod:`statelab.layers.decode`). ``state`` is not modified; the returned state is
        new memory.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"step takes tokens [B] (one per row), got {shape}; use model(ids, state) for [B, T]")
        self.check_input(tokens[:, None])
        if state is None:
            state = self.zero_state(tokens.shape[0], device=tokens.device)
        else:
            self.check_state(state, tokens.shape[0])
        return self._step(tokens, state, None, None)

    def drop_decode_cache(self) -> None:
        """Free the weight copies the decode path keeps (rebuilt by the next decode step that needs them)."""
        from statelab.layers.decode import drop_plan

        drop_plan(self)

    @torch.no_grad()
    def encode(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        positions: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None = None,
        conv_context: torch.Tensor | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> State | list[State]:
        """The state after ``input_ids`` (no output head is computed), or a list of states after each of
        ``positions``, all from one pass.

        ``positions``: 1-based counts of tokens of this call, counted from each row's first real token (position
        ``t`` means "after the row's first ``t`` tokens"); a list of ints (the same for every row) or one list per
        row (``[B, P]``). A position must not exceed its row's length.

        ``lengths`` / ``attention_mask``: padding, as in ``forward``; each returned row is after its own tokens.

        ``conv_context [B, Tc]``: the tokens just before this chunk (at least ``K - 1`` of them; e.g. the last
        tokens of the previous chunk). They are read from zero only to fill the conv windows; then the SSM state
        and ΣΔ are reset to zero and the token count to 0, so the result describes the chunk alone (``n_tokens``
        and ``sum_delta`` count only ``input_ids``) but sees the true left context through the conv. For one
        layer, ordered composition of such chunk states equals the state of the concatenation exactly (State
        Soup, arXiv 2406.08423, §2.4). Cannot be combined with ``state``.
        """
        batch = self._ragged(input_ids, lengths, attention_mask)
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
        if positions is None:
            return self._run(batch.ids, state, None, False, batch.lengths).state
        per_row = _row_positions(positions, batch.row_lengths())
        union = sorted({p for row in per_row for p in row})
        out = self._run(batch.ids, state, union, False, batch.lengths)
        assert out.states_at is not None
        if all(row == per_row[0] for row in per_row):
            where = {p: k for k, p in enumerate(union)}
            return [out.states_at[where[p]] for p in per_row[0]]
        return _gather_rows(out.states_at, union, per_row)

    @torch.no_grad()
    def score(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ScoreResult:
        """Log-probabilities of each row's tokens after its first, given what precedes them (and ``state``).

        Every row needs at least 2 real tokens. Padding as in ``forward``; ``ScoreResult.mask`` marks the real
        predictions and ``perplexity`` averages over them, row by row.
        """
        self.check_input(input_ids)
        if input_ids.shape[1] < 2:
            raise ValueError("score needs at least 2 tokens: the first one has no prediction")
        batch = self._ragged(input_ids, lengths, attention_mask)
        if batch.lengths is not None and bool((batch.lengths < 2).any()):
            rows = (batch.lengths < 2).nonzero().flatten().tolist()
            raise ValueError(f"score needs at least 2 real tokens per row; rows {rows[:5]} have fewer")
        out = self._run(batch.ids, state, None, True, batch.lengths)
        assert out.logits is not None
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        lp = logp.gather(-1, batch.ids[:, 1:].long().unsqueeze(-1)).squeeze(-1)
        valid = batch.valid()[:, 1:]
        lp = torch.where(valid, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
        ppl = torch.exp(-lp.sum(1) / valid.sum(1))
        # back to the caller's layout: prediction j is about token j + 1, so shift by one around the row's start
        full = batch.to_caller(torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1))[:, 1:]
        mask = batch.to_caller(torch.cat([torch.zeros_like(valid[:, :1]), valid], dim=1))[:, 1:]
        return ScoreResult(logprobs=full, perplexity=ppl, state=out.state, mask=mask)

    def _read_prompt(self, input_ids: torch.Tensor, state: State | None, lengths: torch.Tensor | None) -> RunOutput:
        """Read all but the last token of prompts (no output head) for ``generate``: a causal pass by default; a
        model whose layers read a prompt as a bidirectional prefix (Birdie) overrides it."""
        return self._run(input_ids, state, None, False, lengths)

    def _prefill(self, batch: RaggedBatch, state: State | None) -> tuple[torch.Tensor, State]:
        """Read each row's prompt: ``(logits [B, V] after its last real token, state after it)``.

        All but the last token of every row run without the output head (a prompt's other logits are not needed,
        and the head dominates the cost of large vocabularies), then the last tokens run together with it. Rows
        whose lengths differ a lot run in separate groups, so that few padded positions are paid for; the states
        are put back in the rows' order.
        """
        from statelab.models.batching import length_buckets

        B, T = batch.ids.shape
        dev = batch.ids.device
        lengths = batch.row_lengths()
        # no token budget (the caller chose the batch), only the padding cap
        groups = length_buckets(lengths, B * T) if batch.lengths is not None else [list(range(B))]
        prefix_states: list[State] = []
        for idx in groups:
            width = lengths[idx[0]]  # groups are longest first
            if width < 2:
                prefix_states.append(self.zero_state(len(idx), device=dev) if state is None else state.select(idx))
                continue
            rows = torch.tensor(idx, device=dev)
            sub_len = torch.tensor([lengths[i] - 1 for i in idx], device=dev)
            part = self._read_prompt(
                batch.ids.index_select(0, rows)[:, : width - 1],
                None if state is None else state.select(idx),
                None if bool((sub_len == width - 1).all()) else sub_len,
            )
            prefix_states.append(part.state)
        order = [i for idx in groups for i in idx]
        prefix = prefix_states[0] if len(prefix_states) == 1 else State.cat(prefix_states)
        if order != list(range(B)):
            inverse = [0] * B
            for pos, i in enumerate(order):
                inverse[i] = pos
            prefix = prefix.select(inverse)
        last = torch.tensor([n - 1 for n in lengths], device=dev)
        last_ids = batch.ids.gather(1, last[:, None])
        return self._step(last_ids[:, 0], prefix, None, None)

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
        lengths: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` after each row of ``input_ids [B, T]`` (``T >= 1``), from ``state``.

        Each row continues from its own last real token (padding as in ``forward``) and its own state. Greedy when
        ``temperature == 0`` (then every row's tokens equal those of the row generated alone); otherwise samples
        with one local generator seeded by ``seed``, after top-k and nucleus (top-p) filtering. A row that produced
        ``eos_token_id`` stops: its state stays after that EOS and its later slots in ``tokens`` hold the EOS id;
        generation ends when every row has stopped. Returns ``Generation(tokens [B, n], state, lengths [B])``:
        the new tokens, each row's state after its prompt and its own new tokens (so a later call continues
        exactly), and how many new tokens each row produced.
        """
        self.check_input(input_ids)
        if input_ids.shape[1] < 1:
            raise ValueError("generate needs at least one input token to predict the next one from")
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        batch = self._ragged(input_ids, lengths, attention_mask)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        B, T = batch.ids.shape
        dev = input_ids.device
        if state is not None:
            self.check_state(state, B)
        next_logits, state = self._prefill(batch, state)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        produced = torch.zeros(B, dtype=torch.long, device=dev)
        out: list[torch.Tensor] = []
        # two sets of state buffers used in turn: each step reads one and writes the other, so decoding allocates
        # no state memory after the first step (the prefill's state is this function's own, never the caller's)
        spare: State | None = None
        for _ in range(max_new_tokens):
            tok = _pick(next_logits.float(), temperature, top_k, top_p, gen)
            active = ~done
            step_active = None if bool(active.all()) else active
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done = done | (tok == eos_token_id)
            produced += active.long()
            out.append(tok)
            # a row that had stopped before this step reads nothing: its state stays after its EOS
            next_logits, new_state = self._step(tok, state, step_active, spare)
            spare, state = state, new_state
            if eos_token_id is not None and bool(done.all()):
                break
        tokens = torch.stack(out, dim=1) if out else torch.empty(B, 0, dtype=torch.long, device=dev)
        return Generation(tokens, state, produced)


def empty_like_state(state: State) -> State:
    """A state shaped like ``state`` (same dtypes, counts, fingerprint) over new, uninitialised memory (decode
    buffers)."""
    return state.replace(
        ssm=torch.empty_like(state.ssm),
        conv=torch.empty_like(state.conv),
        sum_delta=torch.empty_like(state.sum_delta),
    )


class HFExport:
    """Mixin of models that write a Hugging Face checkpoint; the class defines ``hf_config()`` (the
    ``config.json`` dict, naming the transformers class in ``"architectures"``) and ``hf_state_dict()`` (tensors
    under the transformers names)."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``, loadable by the transformers class
        named in ``hf_config()["architectures"]`` (``from_pretrained``); returns the directory."""
        from statelab.models.loading import write_hf_checkpoint

        return write_hf_checkpoint(directory, self.hf_config(), self.hf_state_dict())


class StepPlan(NamedTuple):
    """Decode weights of a layered model: one ``step_weights`` result per layer and the output head."""

    layers: list[Any]
    head: Matvec


def step_buffers(model: nn.Module, state: State, out: State | None) -> tuple[StepPlan, State]:
    """What a fused decode step of ``model`` needs: its :class:`StepPlan` (every ``model.layers[i].mixer``'s
    ``step_weights`` and the head, tied to ``model.embedding`` when ``model.lm_head`` is None; cached until a
    parameter changes) and the state to write into (``out``, or new memory shaped like ``state``)."""

    def build() -> StepPlan:
        t = transposed_layout(model.device)
        w = model.embedding.weight if model.lm_head is None else model.lm_head.weight
        return StepPlan([b.mixer.step_weights(t) for b in model.layers], matvec(w, None, t))

    return cached_plan(model, build), empty_like_state(state) if out is None else out


def advanced_state(state: State, out: State, active: torch.Tensor | None) -> State:
    """The state of a decode step whose tensors were written into ``out``: ``state``'s counts plus one for every
    active row (``active [B]`` bool, ``None`` = all), ``state``'s fingerprint."""
    if active is None:
        counts = tuple(n + 1 for n in state.tokens)
    else:
        counts = tuple(n + int(a) for n, a in zip(state.tokens, active.tolist(), strict=True))
    return State(state.arch, out.ssm, out.conv, out.sum_delta, counts, state.fingerprint)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that would silently misbehave (NaN, negative, out of range)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")


def _as_lengths(lengths: torch.Tensor | Sequence[int], B: int, T: int) -> torch.Tensor:
    """``lengths`` as an int64 CPU tensor ``[B]`` with every entry in ``[1, T]``, or a ``ValueError`` naming the fix."""
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be integers, got a {lengths.dtype} tensor")
        lt = lengths.detach().to("cpu", torch.long)
    else:
        try:
            vals = list(lengths)
        except TypeError:
            raise TypeError(
                f"lengths must be a sequence of ints or a tensor [B], got {type(lengths).__name__}"
            ) from None
        if any(isinstance(v, bool) or not isinstance(v, (int, torch.Tensor)) for v in vals):
            raise TypeError(f"lengths must be ints, got {vals[:5]}")
        lt = torch.tensor([int(v) for v in vals], dtype=torch.long)
    if lt.dim() != 1 or lt.shape[0] != B:
        raise ValueError(f"lengths must have one entry per row ([{B}]), got shape {tuple(lt.shape)}")
    if B and (int(lt.min()) < 1 or int(lt.max()) > T):
        raise ValueError(
            f"lengths must lie in [1, {T}] (the padded width); got min {int(lt.min())}, max {int(lt.max())}"
        )
    return lt


def _row_positions(
    positions: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, row_lengths: list[int]
) -> list[list[int]]:
    """``positions`` (one list for every row, or one list per row) -> per-row lists, each checked in
    ``[1, length of the row]``."""
    B = len(row_lengths)
    if isinstance(positions, torch.Tensor):
        positions = positions.tolist()
    pos = list(positions)
    if pos and all(isinstance(p, (list, tuple)) for p in pos):
        if len(pos) != B:
            raise ValueError(f"per-row positions need one list per row ({B}), got {len(pos)}")
        rows = [[int(p) for p in r] for r in pos]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("per-row positions must give every row the same number of positions")
    else:
        rows = [[int(p) for p in pos]] * B
    for b, (r, n) in enumerate(zip(rows, row_lengths, strict=True)):
        bad = [p for p in r if p < 1 or p > n]
        if bad:
            raise ValueError(f"positions must lie in [1, {n}] for row {b} (its length), got {bad[:5]}")
    return rows


def _gather_rows(states_at: list[State], union: list[int], per_row: list[list[int]]) -> list[State]:
    """From states at the union of positions (each for the whole batch), the state of row ``b`` after
    ``per_row[b][k]``, for every ``k``."""
    where = {p: k for k, p in enumerate(union)}
    B = len(per_row)
    rows = torch.arange(B)
    ssm = torch.stack([s.ssm for s in states_at])  # [U, L, B, ...]
    conv = torch.stack([s.conv for s in states_at])
    sd = torch.stack([s.sum_delta for s in states_at])
    out = []
    for k in range(len(per_row[0])):
        u = torch.tensor([where[per_row[b][k]] for b in range(B)])

        def pick(t: torch.Tensor, u: torch.Tensor = u) -> torch.Tensor:
            return t[u, :, rows].movedim(0, 1).contiguous()  # [B, L, ...] -> [L, B, ...]

        counts = tuple(states_at[int(u[b])].tokens[b] for b in range(B))
        out.append(states_at[0].replace(ssm=pick(ssm), conv=pick(conv), sum_delta=pick(sd), n_tokens=counts))
    return out


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
