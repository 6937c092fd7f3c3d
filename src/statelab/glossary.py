"""One vocabulary for the whole project: dimension letters and names, mapped to the papers' notation.

Every docstring in statelab writes shapes with these letters, e.g. ``x: [B, T, D]``.

| letter | name          | meaning                                                        | paper notation                |
|--------|---------------|----------------------------------------------------------------|-------------------------------|
| B      | batch         | sequences processed together                                   |                               |
| T      | time          | tokens in the current call                                     | t = 1..T                      |
| L      | layers        | mixer blocks in a model                                        | ℓ = 1..L                      |
| M      | d_model       | residual stream width                                          | d_model                       |
| D      | d_inner       | channels of the SSM (Mamba-1: expand · d_model)                | D (State Soup §2.2)           |
| N      | d_state       | state size per channel (Mamba-1) or per head (Mamba-2)         | N                             |
| H      | heads         | Mamba-2 heads, D = H · P                                       | nheads                        |
| P      | head_dim      | channels per Mamba-2 head                                      | headdim                       |
| G      | n_groups      | Mamba-2 groups sharing B and C                                 | ngroups                       |
| K      | conv kernel   | causal depthwise conv width; the conv state keeps K - 1 inputs | d_conv                        |
| C      | conv channels | channels entering the conv: D (Mamba-1), D + 2·G·N (Mamba-2)   | conv_dim                      |
| R      | dt_rank       | rank of the Δ projection (Mamba-1)                             | dt_rank                       |
| V      | vocab         | vocabulary size (padded)                                       |                               |
| Q      | chunk         | chunk length of a chunked scan                                 | chunk_size                    |

Named quantities:

* **Δ (delta, dt)**: per-token step size, softplus of a projection plus ``dt_bias``; ``[B, T, D]`` for
  Mamba-1, ``[B, T, H]`` for Mamba-2.
* **A**: ``-exp(A_log)``, input-independent and negative; ``[D, N]`` (Mamba-1) or ``[H]`` (Mamba-2).
* **ΣΔ (sum_delta)**: the sum of Δ over the tokens a state has consumed. With it the decay of a whole chunk is
  ``Λ = exp(A · ΣΔ)`` (State Soup §2.4), which ordered composition (A-decay) needs.
* **SSM state h**: ``[B, D, N]`` (Mamba-1) or ``[B, H, P, N]`` (Mamba-2), per layer.
* **conv state**: the last ``K - 1`` pre-conv inputs, ``[B, C, K - 1]``, oldest first, per layer.
* **position of a state**: a state is always "after token t", i.e. it has consumed tokens ``[0, t)`` and
  records ``n_tokens = t``. Feeding it token ``t`` next continues the sequence exactly.
"""

from __future__ import annotations

__all__ = ["LETTERS"]

LETTERS: dict[str, str] = {
    "B": "batch",
    "T": "time",
    "L": "layers",
    "M": "d_model",
    "D": "d_inner",
    "N": "d_state",
    "H": "heads",
    "P": "head_dim",
    "G": "n_groups",
    "K": "conv kernel",
    "C": "conv channels",
    "R": "dt_rank",
    "V": "vocab",
    "Q": "chunk",
}
