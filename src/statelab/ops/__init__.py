"""Sequence operators, each with a naive fp32 reference beside its fast path (same signature).

Every scan lives here, one module or package per op:

* :mod:`statelab.ops.selective_scan` (Mamba-1), :mod:`statelab.ops.ssd` (Mamba-2),
* :mod:`statelab.ops.diag_scan` (time-invariant diagonal recurrences: S5, GD-SSM),
* :mod:`statelab.ops.linear_scan` (gated linear recurrences with per-token decays: gated SSM, Hawk's RG-LRU),
* :mod:`statelab.ops.conv1d` (the causal depthwise convolution; not a recurrence: ``causal_conv1d`` returns
  ``(y, final_window)`` and :func:`~statelab.ops.conv1d.conv_states_at` gives the windows at positions in the same
  ``[B, P, ...]``, ``p in [0, T]`` convention as the scans below).

**One convention for scans.** Each takes its inputs, ``initial_state=None`` (the state before token 0; ``None`` =
zeros), ``output_final_state=False``, ``return_states_at=None`` and ``backend=...``, and returns a
:class:`ScanOutput` ``(y, final_state, sum_delta, states_at, sum_delta_at)``:

* ``return_states_at`` is a sequence of positions ``p`` in ``[0, T]``; position ``p`` means "after the first ``p``
  tokens of this call" (``0`` is the initial state, ``T`` the final state). Anything else is a ``ValueError``.
* ``states_at`` stacks those states on axis 1, ``[B, P, *S]``, in the order asked (repeats allowed); ``None`` when
  no positions were asked for. ``sum_delta`` / ``sum_delta_at`` exist for the ops with a step size Δ (else ``None``).
* Nothing writes into a tensor it was given; returned states are new tensors.

The backend is chosen explicitly by name (each op's ``BACKENDS``); an unknown name is a ``ValueError``.
"""

from statelab.ops.scan_output import ScanOutput, check_positions

__all__ = ["ScanOutput", "check_positions"]
