"""Mamba-2 SSD scan with segment resets, chunked: the training path of packed rows (Birdie).

The recurrence, per head ``h`` (state ``[P, N]``)::

    h_t = exp(a_t) · h_{t-1} + u_t ⊗ B_t,        y_t = h_t C_t,

with ``a_t = Δ_t A_h ≤ 0`` and ``u_t = Δ_t x_t``. A **reset** at ``t`` is ``a_t = -inf``: the decay is zero, so
``h_t = u_t ⊗ B_t`` and nothing before ``t`` reaches ``t`` or any later token. That is how packed samples are kept
apart (their first tokens are resets) and how the reverse half of a bidirectional layer stops at a prefix end.

The four stages are those of :mod:`statelab.ops.ssd.chunk` (Dao & Gu, arXiv 2405.21060, §6); what changes is how
the decays inside a chunk are formed. ``chunk.py`` takes differences of cumulative sums, ``cs_l - cs_s``, which is
``-inf - (-inf)`` (NaN) across a reset. Here every decay is a plain sum of the log-decays it spans, never a
difference (:func:`segment_sums`): a sum that meets a reset is ``-inf`` and its exponential an exact ``0``, a sum
that does not is as precise as the loop's product of the same factors, and no large finite stand-in for ``-inf``
ever enters an ``exp``. The gradient of an exact ``0`` decay is ``0`` (``exp``'s backward multiplies by the
output), so backward is finite too. Chunk-total decays across a reset are ``0``.

All math is fp32. Shapes (``Nc`` chunks of ``Q`` tokens, ``R = H / G`` heads per group):
    u ``[B, T, H, P]``, log_a ``[B, T, H]``, Bm and Cm ``[B, T, G, N]``, states ``[B, H, P, N]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_CHUNK_SIZE", "segment_sums", "ssd_scan_segmented"]

# T = 256 training rows of the Birdie models (d_model 64-128, 8-16 heads) on one thread: 32 and 64 are within a
# few percent; 32 keeps the [Q, Q] temporaries of the diagonal blocks small.
DEFAULT_CHUNK_SIZE = 32


def segment_sums(log_a: torch.Tensor) -> torch.Tensor:
    """The log-decay from token ``j`` to token ``i`` of each chunk, as sums (exact across ``-inf``).

    Args:
        log_a: ``[..., Q]``, log-decays ``≤ 0`` or ``-inf`` (resets).

    Returns:
        ``[..., Q, Q]``: entry ``[i, j]`` is ``log_a[j+1] + … + log_a[i]`` for ``j ≤ i`` (``0`` on the diagonal,
        ``-inf`` when a reset lies in ``(j, i]``) and ``-inf`` for ``j > i``.
    """
    Q = log_a.shape[-1]
    idx = torch.arange(Q, device=log_a.device)
    after = idx[:, None] > idx[None, :]  # [k, j]: token k lies after j
    # column j holds log_a[k] for k > j and 0 above: its running sum over k is the decay from j to each i >= j
    terms = log_a[..., :, None].expand(*log_a.shape, Q).masked_fill(~after, 0.0)
    return terms.cumsum(-2).masked_fill(idx[:, None] < idx[None, :], float("-inf"))


def ssd_scan_segmented(
    u: torch.Tensor,
    log_a: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan of ``h_t = exp(log_a_t) h_{t-1} + u_t ⊗ B_t``, ``y_t = h_t C_t``, with resets, in chunks.

    Args:
        u: ``[B, T, H, P]``, the input ``Δ_t x_t``.
        log_a: ``[B, T, H]``, ``Δ_t A ≤ 0``; ``-inf`` where the state restarts (``h_t = u_t ⊗ B_t``); ``0`` where
            the state must pass through unchanged (padding, with ``u = 0`` there).
        Bm, Cm: ``[B, T, G, N]`` with ``H`` a multiple of ``G`` (head ``h`` reads group ``h // (H / G)``).
        initial_state: ``[B, H, P, N]`` or None (zeros), the state before token 0.
        chunk_size: tokens per chunk ``Q`` (any positive int; a call shorter than it is one chunk).

    Returns:
        ``y [B, T, H, P]`` (no skip term ``D x``) and the state after the last token ``[B, H, P, N]``, both fp32.
    """
    Bsz, T, H, P = u.shape
    G, N = Bm.shape[2], Bm.shape[3]
    if log_a.shape != (Bsz, T, H) or Bm.shape != (Bsz, T, G, N) or Cm.shape != Bm.shape or H % G:
        raise ValueError(
            f"ssd_scan_segmented: u [B, T, H, P], log_a [B, T, H], Bm/Cm [B, T, G, N] with H % G == 0; got "
            f"{tuple(u.shape)}, {tuple(log_a.shape)}, {tuple(Bm.shape)}, {tuple(Cm.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h0 = u.new_zeros(Bsz, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        return u.float(), h0
    R = H // G
    Q = min(chunk_size, T)
    Nc = -(-T // Q)
    pad = Nc * Q - T
    u, log_a, Bm, Cm = u.float(), log_a.float(), Bm.float(), Cm.float()
    if pad:  # log-decay 0 and input 0: the state passes through the tail unchanged
        u = F.pad(u, (0, 0, 0, 0, 0, pad))
        log_a = F.pad(log_a, (0, 0, 0, pad))
        Bm = F.pad(Bm, (0, 0, 0, 0, 0, pad))
        Cm = F.pad(Cm, (0, 0, 0, 0, 0, pad))
    # layout per chunk: [B, Nc, G, R, Q, ...] so that every stage is a batched product per (group, head)
    uh = u.view(Bsz, Nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)  # [B, Nc, G, R, Q, P]
    la = log_a.view(Bsz, Nc, Q, G, R).permute(0, 1, 3, 4, 2)  # [B, Nc, G, R, Q]
    Bc = Bm.view(Bsz, Nc, Q, G, N).transpose(2, 3)  # [B, Nc, G, Q, N]
    Cc = Cm.view(Bsz, Nc, Q, G, N).transpose(2, 3)

    seg = segment_sums(la)  # [B, Nc, G, R, Q, Q]
    from_start = la.cumsum(-1)  # [B, Nc, G, R, Q]: decay from the chunk's entry to token i (sum, -inf past a reset)

    # 1. diagonal blocks: y_i = Σ_{j≤i} exp(seg[i, j]) (C_i · B_j) u_j
    scores = Cc @ Bc.transpose(-1, -2)  # [B, Nc, G, Q, Q]
    y = (torch.exp(seg) * scores[:, :, :, None]) @ uh  # [B, Nc, G, R, Q, P]

    # 2. the state each chunk reaches from zero: Σ_j exp(seg[Q-1, j]) u_j ⊗ B_j
    to_end = torch.exp(seg[..., -1, :])  # [B, Nc, G, R, Q]
    states = (uh * to_end[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # [B, Nc, G, R, P, N]

    # 3. the recurrence over chunks, h_c = exp(total_c) h_{c-1} + states_c
    total = torch.exp(from_start[..., -1])[..., None, None]  # [B, Nc, G, R, 1, 1]
    h = h0.view(Bsz, G, R, P, N)
    entering = []
    for c in range(Nc):
        entering.append(h)
        h = torch.addcmul(states[:, c], total[:, c], h)
    hin = torch.stack(entering, 1)  # [B, Nc, G, R, P, N]

    # 4. what the entering state gives each token: exp(from_start_i) (h_{c-1} C_i)
    yin = Cc[:, :, :, None] @ hin.transpose(-1, -2)  # [B, Nc, G, R, Q, P]
    y = y + yin * torch.exp(from_start)[..., None]
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(Bsz, Nc * Q, H, P)[:, :T]
    return y, h.reshape(Bsz, H, P, N)
