"""Causal depthwise 1-D convolution with an explicit conv state (the short convolution of Mamba blocks).

For channel ``c`` and kernel width ``K``::

    y[t, c] = act( bias[c] + Σ_{k=0}^{K-1} weight[c, k] · x̃[t + k, c] )

where ``x̃`` is the input prefixed with the ``K - 1`` inputs seen before this call (the conv state, oldest first;
zeros for a fresh sequence). The conv state after a call is the last ``K - 1`` entries of ``x̃``. This matches
``nn.Conv1d(groups=C, padding=K-1)`` truncated to the first ``T`` outputs, which is how Mamba checkpoints were
trained (weight ``[C, 1, K]`` there, ``[C, K]`` here).

``causal_conv1d`` is the fast path (K fused multiply-adds over the state-prefixed input, time-major);
``causal_conv1d_naive``
is the per-token reference loop with the same signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d", "causal_conv1d_naive", "conv_states_at", "conv_state_after"]


def _check(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None, activation: str | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, C], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv1d: weight must be [C={x.shape[2]}, K], got {tuple(weight.shape)}")
    K = weight.shape[1]
    if initial_state is not None and tuple(initial_state.shape) != (x.shape[0], x.shape[2], K - 1):
        raise ValueError(
            f"causal_conv1d: initial_state must be [B={x.shape[0]}, C={x.shape[2]}, K-1={K - 1}], "
            f"got {tuple(initial_state.shape)}"
        )
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")


def _padded(x: torch.Tensor, K: int, initial_state: torch.Tensor | None) -> torch.Tensor:
    """``[B, C, K - 1 + T]``: the conv state followed by ``x`` transposed to channels-first."""
    xt = x.transpose(1, 2)
    if initial_state is None:
        return F.pad(xt, (K - 1, 0))
    return torch.cat([initial_state.to(x.dtype), xt], dim=2)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv of ``x [B, T, C]`` continuing from ``initial_state [B, C, K - 1]``.

    Args:
        x: ``[B, T, C]`` inputs.
        weight: ``[C, K]`` taps; ``weight[:, -1]`` multiplies the current input.
        bias: ``[C]`` or ``None``.
        initial_state: ``[B, C, K - 1]``, the inputs before ``x`` (oldest first); ``None`` = zeros.
        activation: ``"silu"`` or ``None``.
        output_final_state: also return the state after the last token.

    Returns:
        ``(y [B, T, C], final_state [B, C, K - 1] | None)``. ``final_state`` is a new tensor, never a view of an
        input.
    """
    _check(x, weight, initial_state, activation)
    K = weight.shape[1]
    if x.shape[1] == 1 and initial_state is not None:
        # one token (decode): a dot product with the window is far cheaper than a convolution call
        xp = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, K]
        y = (xp * weight.to(x.dtype)).sum(-1, keepdim=True)
        if bias is not None:
            y = y + bias.to(x.dtype)[:, None]
        if activation == "silu":
            y = F.silu(y)
        final = xp[:, :, 1:].clone() if output_final_state else None
        return y.transpose(1, 2), final
    # Time-major taps: y = b + Σ_k w[:, k] · x̃[t + k]. Staying in [B, T, C] avoids two transposes and gives the
    # next projection a contiguous input; it measured ~2.5x faster than F.conv1d on Mamba shapes.
    prev = (
        x.new_zeros(x.shape[0], K - 1, x.shape[2])
        if initial_state is None
        else initial_state.to(x.dtype).transpose(1, 2)
    )
    xp = torch.cat([prev, x], dim=1)  # [B, K - 1 + T, C]
    T = x.shape[1]
    w = weight.to(x.dtype)
    y = torch.mul(xp[:, K - 1 :], w[:, K - 1])
    if bias is not None:
        y.add_(bias.to(x.dtype))
    for k in range(K - 1):
        y.addcmul_(xp[:, k : k + T], w[:, k])
    if activation == "silu":
        y = F.silu(y, inplace=not torch.is_grad_enabled())
    final = xp[:, T:].transpose(1, 2).clone() if output_final_state else None
    return y, final


def causal_conv1d_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: one token at a time with an explicit sliding window, in fp32. Same contract as ``causal_conv1d``."""
    _check(x, weight, initial_state, activation)
    B, T, C = x.shape
    K = weight.shape[1]
    w = weight.float()
    window = x.new_zeros(B, C, K - 1, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(T):
        full = torch.cat([window, x[:, t, :, None].float()], dim=2)  # [B, C, K], oldest first
        y = (full * w).sum(-1)
        if bias is not None:
            y = y + bias.float()
        if activation == "silu":
            y = F.silu(y)
        ys.append(y)
        window = full[:, :, 1:]
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, C).float()
    return y.to(x.dtype), (window.to(x.dtype).clone() if output_final_state else None)


def conv_states_at(
    x: torch.Tensor, K: int, positions: Sequence[int], initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Conv states after ``positions`` tokens of ``x [B, T, C]`` -> ``[B, P, C, K - 1]`` (new memory).

    Position ``p`` (``0 <= p <= T``) is the state after ``x[:, :p]``: the ``K - 1`` inputs before token ``p``,
    reaching back into ``initial_state`` when ``p < K - 1``.
    """
    T = x.shape[1]
    if any(p < 0 or p > T for p in positions):
        raise ValueError(f"conv_states_at: positions must lie in [0, {T}], got {list(positions)}")
    xp = _padded(x, K, initial_state)
    if not positions:
        return xp.new_zeros(x.shape[0], 0, x.shape[2], K - 1)
    return torch.stack([xp[:, :, p : p + K - 1] for p in positions], dim=1).clone()


def conv_state_after(
    x: torch.Tensor, K: int, lengths: torch.Tensor, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Each row's conv state after its own ``lengths[b]`` tokens of ``x [B, T, C]`` -> ``[B, C, K - 1]`` (new memory).

    Row ``b``'s state is the ``K - 1`` inputs before its token ``lengths[b]`` (``0 <= lengths[b] <= T``), reaching
    back into ``initial_state`` when ``lengths[b] < K - 1``: the inputs after a row's length (padding) are never
    read. This is the conv state of a right-padded ragged batch.
    """
    B, T, C = x.shape
    if lengths.shape != (B,):
        raise ValueError(f"conv_state_after: lengths must be [B={B}], got {tuple(lengths.shape)}")
    if K == 1:
        return x.new_zeros(B, C, 0)
    prev = x.new_zeros(B, K - 1, C) if initial_state is None else initial_state.to(x.dtype).transpose(1, 2)
    xp = torch.cat([prev, x], dim=1)  # [B, K - 1 + T, C]; the window after l tokens is xp[l : l + K - 1]
    idx = lengths.to(device=x.device, dtype=torch.long)[:, None] + torch.arange(K - 1, device=x.device)
    win = xp.gather(1, idx[:, :, None].expand(B, K - 1, C))  # [B, K - 1, C]
    return win.transpose(1, 2).contiguous()
