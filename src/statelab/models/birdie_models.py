"""Language models for the Birdie study (arXiv 2411.01030, Table 7, scaled down): Gated SSM, Hawk, Transformer.

``logits, state = model(input_ids [B, T], state=None, seq_start=None, is_prefix=None)``

* ``gated_ssm``: fused pre-norm residual blocks ``x + GatedSSM(RMSNorm(x))``.
* ``hawk``: ``x + RG-LRU block(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` (gated GeLU, 8/3 expansion).
* ``mamba2``: ``x + Mamba2Mixer(RMSNorm(x))`` with the mixer of :mod:`statelab.layers.mamba2`; bidirectional
  layers split its heads (:class:`statelab.layers.bidirectional.BidirectionalMamba2Mixer`).
* ``transformer``: causal attention with RoPE and the same MLP; with ``bidirectional`` every layer attends
  bidirectionally inside the prefix (prefix-LM attention), as the paper's Transformer "Birdie".

With ``bidirectional`` the recurrent models alternate bidirectional-prefix layers (even indices) and causal layers
(odd indices) with the same parameter count as the causal model. ``seq_start`` and ``is_prefix`` come from the
packer (:mod:`statelab.objectives.packing`); packed samples never see each other.

The state (:class:`BirdieState`) is "after the last token": per layer a tuple of tensors (gated SSM: ``(h,)``;
Hawk: ``(h, conv)``; Mamba-2: ``(ssm, conv)``; Transformer: ``(k, v)`` caches ``[B, heads, S, head_dim]``).
A call never modifies the state it is given. Generation runs the prompt in parallel (as the prefix) and then
decodes recurrently from the state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from statelab.errors import ConfigError, StateMismatchError
from statelab.layers.bidirectional import BidirectionalMamba2Mixer
from statelab.layers.gated_ssm import GatedSSMLayer
from statelab.layers.hawk import HawkLayer
from statelab.layers.norm import RMSNorm
from statelab.layers.protocol import Segments

__all__ = ["BirdieModelConfig", "BirdieState", "BirdieLM", "ARCHES"]

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


@dataclass(frozen=True)
class BirdieState:
    """State of a :class:`BirdieLM` after ``n_tokens`` tokens: ``layers[i]`` is layer ``i``'s tuple of tensors."""

    arch: str
    layers: tuple[tuple[torch.Tensor, ...], ...]
    n_tokens: int

    def clone(self) -> BirdieState:
        return dataclasses.replace(self, layers=tuple(tuple(t.clone() for t in lay) for lay in self.layers))

    def detach(self) -> BirdieState:
        return dataclasses.replace(self, layers=tuple(tuple(t.detach() for t in lay) for lay in self.layers))


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
    """Rotary embedding of ``x [B, H, T, P]`` at integer positions ``pos [T]``."""
    P = x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, P, 2, device=x.device, dtype=torch.float32) / P)
    ang = pos.float()[:, None] * freq[None]  # [T, P/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class _Attention(nn.Module):
    """Multi-head attention restricted to the current sample; causal, or bidirectional inside the prefix."""

    def __init__(self, d: int, n_heads: int, prefix_lm: bool) -> None:
        super().__init__()
        self.h, self.p, self.prefix_lm = n_heads, d // n_heads, prefix_lm
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, state, seq_start, is_prefix, offset):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.p).permute(2, 0, 3, 1, 4)
        pos = torch.arange(offset, offset + T, device=x.device)
        q, k = _rope(q, pos), _rope(k, pos)
        S0 = 0 if state is None else state[0].shape[2]
        if state is not None:
            k = torch.cat([state[0], k], dim=2)
            v = torch.cat([state[1], v], dim=2)
        seg = torch.cumsum(seq_start.long(), dim=1)  # [B, T]; cached keys belong to segment 0
        kseg = torch.cat([seg.new_zeros(B, S0), seg], dim=1)
        kpre = torch.cat([is_prefix.new_zeros(B, S0), is_prefix], dim=1)
        qi = torch.arange(T, device=x.device)[:, None] + S0
        ki = torch.arange(S0 + T, device=x.device)[None]
        allowed = (ki <= qi)[None] | (self.prefix_lm & is_prefix[:, :, None] & kpre[:, None, :])
        allowed = allowed & (seg[:, :, None] == kseg[:, None, :])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.out(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


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

    def forward(self, x, state, seq_start, is_prefix, offset):
        h = self.norm(x)
        if self.arch == "transformer":
            y, new = self.mixer(h, state, seq_start, is_prefix, offset)
        elif self.arch in ("hawk", "mamba2"):
            y, new = self.mixer(h, state, segments=Segments(seq_start, is_prefix))
        else:
            y, s = self.mixer(h, None if state is None else state[0], segments=Segments(seq_start, is_prefix))
            new = (s,)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, tuple(new)


class BirdieLM(nn.Module):
    """Gated SSM, Hawk or Transformer LM with the statelab ``(logits, state)`` convention."""

    def __init__(self, config: BirdieModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(config.d_model))
        self.blocks = nn.ModuleList(_Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=1e-5, style="torch")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        state: BirdieState | None = None,
        seq_start: torch.Tensor | None = None,
        is_prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BirdieState]:
        """``input_ids [B, T]`` after ``state`` -> ``(logits [B, T, V], state after the last token)``.

        ``seq_start``/``is_prefix [B, T]`` bool (default: one continuing sample, all causal). Without a state,
        position 0 starts a sample.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if state is not None and (state.arch != self.config.arch or len(state.layers) != self.config.n_layer):
            raise StateMismatchError(
                f"state is from a {state.arch} model with {len(state.layers)} layers, not this "
                f"{self.config.arch} model with {self.config.n_layer}"
            )
        if seq_start is None:
            seq_start = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
        if is_prefix is None:
            is_prefix = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
        offset = 0 if state is None else state.n_tokens
        x = self.embed(input_ids)
        new_layers = []
        for i, blk in enumerate(self.blocks):
            x, s = blk(x, None if state is None else state.layers[i], seq_start, is_prefix, offset)
            new_layers.append(s)
        logits = F.linear(self.norm_f(x), self.embed.weight)
        return logits, BirdieState(self.config.arch, tuple(new_layers), offset + T)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, prefix: bool = True) -> torch.Tensor:
        """Greedy continuation of ``prompt [B, T]``: a parallel pass over the prompt (as the bidirectional prefix
        when ``prefix``), then one recurrent step per new token from the state. Returns ``[B, max_new_tokens]``."""
        B, T = prompt.shape
        is_prefix = torch.full((B, T), prefix, dtype=torch.bool, device=prompt.device)
        is_prefix[:, -1] = False  # the last prompt token predicts the first new one: it belongs to the suffix
        logits, state = self(prompt, None, None, is_prefix)
        out = []
        for _ in range(max_new_tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            logits, state = self(tok, state)
        return torch.cat(out, 1) if out else prompt.new_zeros(B, 0)
