"""Language models for the Birdie study (arXiv 2411.01030, Table 7, scaled down): Gated SSM, Hawk, Mamba-2 and a
Transformer, as :class:`~statelab.models.base.StatefulLM` models with :class:`~statelab.state.core.State` states.

``logits, state = model(input_ids [B, T], state=None, lengths=None, attention_mask=None, *, segments=None)``

* ``gated_ssm``: fused pre-norm residual blocks ``x + GatedSSM(RMSNorm(x))``.
* ``hawk``: ``x + RG-LRU block(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` (gated GeLU, 8/3 expansion).
* ``mamba2``: ``x + Mamba2Mixer(RMSNorm(x))`` with the mixer of :mod:`statelab.layers.mamba2`; bidirectional
  layers split its heads (:class:`statelab.layers.bidirectional.BidirectionalMamba2Mixer`).
* ``transformer``: causal attention with RoPE and the same MLP; with ``bidirectional`` every layer attends
  bidirectionally inside the prefix (prefix-LM attention), as the paper's Transformer "Birdie".

With ``bidirectional`` the recurrent models alternate bidirectional-prefix layers (even indices) and causal layers
(odd indices) with the same parameter count as the causal model. ``segments``
(:class:`~statelab.layers.protocol.Segments`: ``seq_start``, ``is_prefix``) come from the packer
(:mod:`statelab.objectives.packing`); packed samples never see each other. Without ``segments`` a call is causal.

**State.** A :class:`~statelab.state.core.State` of architecture ``"birdie_<arch>"`` (registered in
:mod:`statelab.state.core`), "after the last token": ``ssm`` holds each layer's recurrent state (gated SSM and Hawk
``[L, B, D]``, Mamba-2 ``[L, B, H, P, N]``; a bidirectional layer keeps its forward half in the first half, the rest
is zero), ``conv`` Hawk's and Mamba-2's conv windows, no ΣΔ. The Transformer's state is its key/value cache
(``ssm`` = keys, ``conv`` = values, ``[L, B, heads, S, head_dim]``, left-aligned per row). So the shared
machinery works on these models: ragged batches (``lengths`` / ``attention_mask``), ``encode`` with positions,
``score``, ``generate``, state files and the state store; order-free mixing works on the recurrent ones (ordered
composition needs ΣΔ, which they do not track; a key/value cache is not mixed). ``generate`` reads the prompt
(all but its last token) as the bidirectional prefix, then decodes recurrently from the state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from statelab.errors import ConfigError
from statelab.layers.bidirectional import BidirectionalMamba2Mixer
from statelab.layers.gated_ssm import GatedSSMLayer
from statelab.layers.hawk import HawkLayer
from statelab.layers.norm import RMSNorm
from statelab.layers.protocol import Segments
from statelab.models.base import RunOutput, StatefulLM
from statelab.state.core import State

__all__ = ["BirdieModelConfig", "BirdieLM", "ARCHES"]

ARCHES = ("gated_ssm", "hawk", "transformer", "mamba2")


@dataclass(frozen=True)
class BirdieModelConfig:
    """Config of a Birdie-study model.

    Attributes:
        arch: ``"gated_ssm"``, ``"hawk"`` or ``"transformer"``.
        vocab_size: ``V``; d_model: ``M``; n_layer: blocks.
        d_state: recurrent channels ``D`` of the SSM layers (paper: 1.25 · d_model).
        bidirectional: alternate bidirectional-prefix layers (SSMs) / prefix-LM attention (Transformer).
        mlp_mult: MLP expansion of Hawk and the Transformer; n_heads: attention heads; conv_kernel: Hawk's and
            Mamba-2's conv.
        mamba2_state, mamba2_head_dim: N and P of the Mamba-2 mixers (d_inner = 2 · d_model, one group).
    """

    arch: str = "gated_ssm"
    vocab_size: int = 408
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 160
    bidirectional: bool = False
    mlp_mult: float = 8 / 3
    n_heads: int = 4
    conv_kernel: int = 4
    mamba2_state: int = 16
    mamba2_head_dim: int = 16

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ConfigError(f"arch must be one of {ARCHES}, got {self.arch!r}")
        if min(self.vocab_size, self.d_model, self.n_layer, self.d_state) < 1:
            raise ConfigError("vocab_size, d_model, n_layer and d_state must be positive")
        if self.arch == "transformer" and self.d_model % (2 * self.n_heads):
            raise ConfigError(f"d_model {self.d_model} must be a multiple of 2 · n_heads ({2 * self.n_heads})")

    def layer_is_bidirectional(self, i: int) -> bool:
        if self.arch == "transformer":
            return self.bidirectional
        return self.bidirectional and i % 2 == 0


class _MLP(nn.Module):
    def __init__(self, d: int, mult: float) -> None:
        super().__init__()
        h = int(round(d * mult / 8)) * 8 or 8
        self.up = nn.Linear(d, 2 * h)
        self.down = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.gelu(a) * b)


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, H, T, P]`` at integer positions ``pos [B, T]`` (each row its own)."""
    P = x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, P, 2, device=x.device, dtype=torch.float32) / P)
    ang = pos.float()[..., None] * freq  # [B, T, P/2]
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class _Attention(nn.Module):
    """Multi-head attention restricted to the current sample; causal, or bidirectional inside the prefix.

    The cache ``(k, v) [B, H, S, P]`` is left-aligned: row ``b``'s first ``counts[b]`` entries are its keys and
    values, the rest is unused; the new cache keeps each row's old entries and its ``lengths[b]`` new ones.
    """

    def __init__(self, d: int, n_heads: int, prefix_lm: bool) -> None:
        super().__init__()
        self.h, self.p, self.prefix_lm = n_heads, d // n_heads, prefix_lm
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, cache, counts, lengths, seq_start, is_prefix):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.p).permute(2, 0, 3, 1, 4)
        pos = counts[:, None] + torch.arange(T, device=x.device)  # [B, T], each row from its own count
        q, k = _rope(q, pos), _rope(k, pos)
        S0 = 0 if cache is None else cache[0].shape[2]
        if cache is not None:
            k = torch.cat([cache[0].to(k.dtype), k], dim=2)
            v = torch.cat([cache[1].to(v.dtype), v], dim=2)
        ar = torch.arange(T, device=x.device)
        new_ok = (ar[None, :] <= ar[:, None])[None] | (self.prefix_lm & is_prefix[:, :, None] & is_prefix[:, None, :])
        seg = torch.cumsum(seq_start.long(), dim=1)  # [B, T]; cached keys belong to segment 0
        same = seg[:, :, None] == seg[:, None, :]
        old_ok = (torch.arange(S0, device=x.device)[None] < counts[:, None])[:, None, :] & (seg == 0)[..., None]
        allowed = torch.cat([old_ok.expand(B, T, S0), new_ok & same], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        # the new cache, left-aligned: row b keeps cache[:counts[b]] then its lengths[b] new entries
        width = int((counts + lengths).max()) if B else 0
        j = torch.arange(width, device=x.device)[None]
        src = torch.where(j < counts[:, None], j, S0 + j - counts[:, None]).clamp(max=max(S0 + T - 1, 0))
        idx = src[:, None, :, None].expand(B, self.h, width, self.p)
        return self.out(y.transpose(1, 2).reshape(B, T, -1)), (k.gather(2, idx), v.gather(2, idx))


class _Block(nn.Module):
    def __init__(self, cfg: BirdieModelConfig, i: int) -> None:
        super().__init__()
        bi = cfg.layer_is_bidirectional(i)
        self.norm = RMSNorm(cfg.d_model, eps=1e-5, style="torch")
        self.mlp = None
        if cfg.arch == "gated_ssm":
            self.mixer = GatedSSMLayer(cfg.d_model, cfg.d_state, bidirectional=bi)
        elif cfg.arch == "hawk":
            self.mixer = HawkLayer(cfg.d_model, cfg.d_state, cfg.conv_kernel, bidirectional=bi)
        elif cfg.arch == "mamba2":
            self.mixer = BidirectionalMamba2Mixer(
                cfg.d_model,
                2 * cfg.d_model,
                cfg.mamba2_state,
                1,
                cfg.mamba2_head_dim,
                cfg.conv_kernel,
                bidirectional=bi,
            )
        else:
            self.mixer = _Attention(cfg.d_model, cfg.n_heads, prefix_lm=bi)
        if cfg.arch in ("hawk", "transformer"):
            self.norm2 = RMSNorm(cfg.d_model, eps=1e-5, style="torch")
            self.mlp = _MLP(cfg.d_model, cfg.mlp_mult)
        self.arch = cfg.arch

    def forward(self, x, state, counts, lengths, seq_start, is_prefix, row_lengths):
        """``state``: this layer's mixer state (``None`` = zeros); ``lengths [B]`` real new tokens per row;
        ``row_lengths``: the same as given to the mixers (``None`` when every row is full)."""
        h = self.norm(x)
        if self.arch == "transformer":
            y, new = self.mixer(h, state, counts, lengths, seq_start, is_prefix)
        else:
            y, new = self.mixer(h, state, lengths=row_lengths, segments=Segments(seq_start, is_prefix))
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, new


class BirdieLM(StatefulLM):
    """Gated SSM, Hawk, Mamba-2 or Transformer LM with the statelab ``(logits, state)`` convention (module
    docstring); ``arch`` is ``"birdie_<config.arch>"``."""

    def __init__(self, config: BirdieModelConfig) -> None:
        super().__init__()
        self.config = config
        self.arch = f"birdie_{config.arch}"
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(config.d_model))
        self.blocks = nn.ModuleList(_Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=1e-5, style="torch")

    @property
    def embedding(self) -> nn.Embedding:
        """The input embedding (tied with the output head)."""
        return self.embed

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def decay_A(self) -> torch.Tensor:
        raise ConfigError(
            f"{self.arch} states track no ΣΔ, so ordered composition (adecay, append, hybrid, picaso) does not apply; "
            "use an order-free mix (mean, weighted, ...)"
        )

    def _layer_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence shapes of one layer's ``ssm`` and ``conv`` parts (the Transformer's with an empty cache)."""
        c = self.config
        if c.arch == "gated_ssm":
            return (c.d_state,), (0, 0)
        if c.arch == "hawk":
            return (c.d_state,), (c.d_state, c.conv_kernel - 1)
        if c.arch == "mamba2":
            m = self.blocks[0].mixer
            return (m.n_heads, m.head_dim, m.d_state), (m.conv_dim, m.d_conv - 1)
        hd = c.d_model // c.n_heads
        return (c.n_heads, 0, hd), (c.n_heads, 0, hd)

    def zero_state(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> State:
        """The state before any token: zeros (recurrent archs) or an empty cache (Transformer); fp32."""
        dtype = torch.float32 if dtype is None else dtype
        device = self.device if device is None else device
        L = self.config.n_layer
        ssm_shape, conv_shape = self._layer_shapes()
        return State(
            arch=self.arch,
            ssm=torch.zeros(L, batch_size, *ssm_shape, dtype=dtype, device=device),
            conv=torch.zeros(L, batch_size, *conv_shape, dtype=dtype, device=device),
            sum_delta=torch.zeros(L, batch_size, 0, dtype=torch.float32, device=device),
            n_tokens=0,
            fingerprint=self.fingerprint if str(device) != "meta" else "",
        )

    def _layer_state(self, state: State, i: int) -> Any:
        """Layer ``i``'s mixer state out of a model state (the forward half of a bidirectional layer)."""
        mixer, dt = self.blocks[i].mixer, self.embed.weight.dtype
        arch = self.config.arch
        if arch == "transformer":
            return state.ssm[i].to(dt), state.conv[i].to(dt)
        if arch == "mamba2":
            return state.ssm[i][:, : mixer.state_heads], state.conv[i].to(dt)
        h = state.ssm[i][:, : mixer.state_dim]
        return h if arch == "gated_ssm" else (h, state.conv[i].to(dt))

    def _stack(self, layer_states: list[Any], tokens: Sequence[int]) -> State:
        """Per-layer mixer states -> one ``State`` (bidirectional layers padded with zeros; fp32)."""
        arch = self.config.arch
        ssm_shape, conv_shape = self._layer_shapes()
        ssm, conv = [], []
        for st in layer_states:
            if arch == "gated_ssm":
                h, cv = st, st.new_zeros(st.shape[0], *conv_shape)
            else:
                h, cv = st
            if arch != "transformer" and h.shape[1] != ssm_shape[0]:
                h = torch.cat([h, h.new_zeros(h.shape[0], ssm_shape[0] - h.shape[1], *h.shape[2:])], 1)
            ssm.append(h.float())
            conv.append(cv.float())
        B = ssm[0].shape[0]
        return State(
            arch=self.arch,
            ssm=torch.stack(ssm),
            conv=torch.stack(conv),
            sum_delta=ssm[0].new_zeros(len(ssm), B, 0),
            n_tokens=tuple(tokens),
            fingerprint=self.fingerprint,
        )

    def _run(
        self,
        input_ids: torch.Tensor,
        state: State | None,
        positions: Sequence[int] | None,
        with_head: bool,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> RunOutput:
        """One pass (see :class:`StatefulLM`); ``segments`` for packed rows. States at ``positions`` come from
        running the pieces between them one after another (exact: a continuation equals the full pass)."""
        self.check_input(input_ids)
        B, T = input_ids.shape
        if state is not None:
            self.check_state(state, B)
        if positions is not None:
            if segments is not None:
                raise ValueError("positions cannot be combined with segments (packed rows)")
            return self._run_at(input_ids, state, [int(p) for p in positions], with_head, lengths)
        dev = input_ids.device
        counts = torch.tensor((0,) * B if state is None else state.tokens, device=dev, dtype=torch.long)
        new = torch.full((B,), T, device=dev, dtype=torch.long) if lengths is None else lengths.to(dev).long()
        if segments is None:
            seq_start = torch.zeros(B, T, dtype=torch.bool, device=dev)
            is_prefix = torch.zeros(B, T, dtype=torch.bool, device=dev)
        else:
            seq_start, is_prefix = segments
            seq_start = torch.zeros(B, T, dtype=torch.bool, device=dev) if seq_start is None else seq_start.bool()
            is_prefix = torch.zeros(B, T, dtype=torch.bool, device=dev) if is_prefix is None else is_prefix.bool()
        if lengths is not None:  # padding is neither a sample start nor part of a prefix
            valid = torch.arange(T, device=dev) < new[:, None]
            seq_start, is_prefix = seq_start & valid, is_prefix & valid
        x = self.embed(input_ids.long())
        layer_states = []
        for i, blk in enumerate(self.blocks):
            ls = None if state is None else self._layer_state(state, i)
            x, st = blk(x, ls, counts, new, seq_start, is_prefix, lengths)
            layer_states.append(st)
        logits = F.linear(self.norm_f(x), self.embed.weight) if with_head else None
        return RunOutput(logits=logits, state=self._stack(layer_states, (counts + new).tolist()))

    def _run_at(
        self,
        input_ids: torch.Tensor,
        state: State | None,
        positions: list[int],
        with_head: bool,
        lengths: torch.Tensor | None,
    ) -> RunOutput:
        B, T = input_ids.shape
        bad = [p for p in positions if p < 0 or p > T]
        if bad:
            raise ValueError(f"positions must lie in [0, {T}], got {bad}")
        at: dict[int, State] = {0: self.zero_state(B, device=input_ids.device) if state is None else state}
        logits = []
        cur, start = at[0], 0
        for end in sorted({*positions, T} - {0}):
            sub = None
            if lengths is not None:
                sub = (lengths.to(input_ids.device).long() - start).clamp(0, end - start)
                sub = None if bool((sub == end - start).all()) else sub
            out = self._run(input_ids[:, start:end], cur, None, with_head, sub)
            cur, start = out.state, end
            at[end] = cur
            if out.logits is not None:
                logits.append(out.logits)
        return RunOutput(
            logits=torch.cat(logits, 1) if with_head else None, state=cur, states_at=[at[p] for p in positions]
        )

    def _read_prompt(self, input_ids: torch.Tensor, state: State | None, lengths: torch.Tensor | None) -> RunOutput:
        """A prompt (all but its last token) is read as the bidirectional prefix (Birdie's prefix-LM use)."""
        B, T = input_ids.shape
        n = torch.full((B,), T, device=input_ids.device) if lengths is None else lengths.to(input_ids.device)
        prefix = torch.arange(T, device=input_ids.device) < n[:, None]
        return self._run(input_ids, state, None, False, lengths, Segments(None, prefix))

    def forward(
        self,
        input_ids: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, State]:
        """``input_ids [B, T]`` after ``state`` -> ``(logits [B, T, V], state after each row's last real token)``.

        ``lengths`` / ``attention_mask``: ragged batches, as :meth:`StatefulLM.forward`. ``segments``: packed rows
        (:class:`~statelab.layers.protocol.Segments`, ``[B, T]`` masks; the packer's padding is its own suffix), not
        combined with ``lengths`` / ``attention_mask``. Without a state, position 0 starts a sample.
        """
        if segments is None:
            return super().forward(input_ids, state, lengths, attention_mask)
        if lengths is not None or attention_mask is not None:
            raise ValueError("give segments (packed rows) or lengths / attention_mask (padding), not both")
        out = self._run(input_ids, state, None, True, None, segments)
        assert out.logits is not None
        return out.logits, out.state
