"""Convert a ``State`` to and from the transformers 5.x cache of ``MambaForCausalLM`` / ``Mamba2ForCausalLM``.

transformers (5.23) keeps the recurrent state of Mamba models in a ``DynamicCache`` of ``LinearAttentionLayer`` s,
one per layer, each with one conv state and one recurrent (SSM) state:

| arch    | transformers conv state | statelab conv        | transformers ssm state | statelab ssm         |
|---------|-------------------------|----------------------|------------------------|----------------------|
| mamba1  | ``[B, D, K]``           | ``[L, B, D, K - 1]`` | ``[B, D, N]``          | ``[L, B, D, N]``     |
| mamba2  | ``[B, C, K]``           | ``[L, B, C, K - 1]`` | ``[B, H, P, N]``       | ``[L, B, H, P, N]``  |

transformers keeps ``K`` pre-conv inputs, oldest first; the oldest one never reaches an output (a step
convolves the last ``K - 1`` cached inputs with the new one), so statelab keeps ``K - 1`` and pads a zero
column when exporting. The conv channel order of Mamba-2 is ``[x, B, C]`` in both. transformers does not
track ΣΔ: a state imported from a cache has an unknown ΣΔ (NaN) unless the caller passes it; order-free mixing
works on such a state, ordered composition refuses it.

Which transformers continuation routes are exact from an injected cache (tested in ``tests/state/test_interop.py``,
transformers 5.23, CPU reference kernels):

* **one token per call** (``model(tok[:, None], cache_params=cache, use_cache=True)``): exact for both
  architectures. :func:`hf_generate` uses only this route.
* ``generate(last_token, cache_params=cache)``: exact; its first step is a one-token call.
* **several tokens per call**: Mamba-2 exact (the chunked scan takes ``initial_states`` and the cached conv
  window). Mamba-1 **wrong**: the conv window is used but the selective scan restarts from a zero SSM state
  (mamba_ssm PRs #806/#830 for the kernel). ``generate(prompt, cache_params=cache)`` with
  a prompt of several tokens takes this route on its first step, so it is wrong for Mamba-1 too.

Example::

    state = model.encode(prefix_ids)                        # statelab
    new_tokens, cache = hf_generate(hf_model, prompt_ids, state, max_new_tokens=20)
    back = from_hf_cache(cache, model, n_tokens=...)        # and back to a State
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from statelab.errors import StateMismatchError
from statelab.state.core import State

__all__ = ["hf_arch", "to_hf_cache", "from_hf_cache", "hf_step", "hf_generate"]

_MODEL_TYPES = {"mamba": "mamba1", "mamba2": "mamba2"}


def hf_arch(hf_model: Any) -> str:
    """statelab architecture of a transformers model (``"mamba1"`` / ``"mamba2"``), or a clear error."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    arch = _MODEL_TYPES.get(model_type)
    if arch is None:
        raise StateMismatchError(
            f"expected a transformers Mamba or Mamba2 model (model_type 'mamba' or 'mamba2'), got {model_type!r}"
        )
    return arch


def _expected(hf_model: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """``(L, conv [C, K], ssm [...])`` per-sequence shapes of the transformers cache for ``hf_model``."""
    c = hf_model.config
    K = int(c.conv_kernel)
    if hf_arch(hf_model) == "mamba1":
        D = int(c.intermediate_size)
        return int(c.num_hidden_layers), (D, K), (D, int(c.state_size))
    D = int(c.expand * c.hidden_size)
    conv_dim = D + 2 * int(c.n_groups) * int(c.state_size)
    return int(c.num_hidden_layers), (conv_dim, K), (int(c.num_heads), int(c.head_dim), int(c.state_size))


def to_hf_cache(state: State, hf_model: Any, *, dtype: torch.dtype | None = None):
    """A transformers ``DynamicCache`` holding ``state`` (copies; the state is not shared or modified).

    Args:
        state: a state whose layout fits ``hf_model`` (same architecture, layers and sizes). Whether it was made
            by the same weights cannot be checked here: the caller pairs a statelab model and a transformers
            model loaded from one checkpoint.
        hf_model: ``MambaForCausalLM`` or ``Mamba2ForCausalLM``.
        dtype: dtype of the cache tensors (default: the state's).

    Returns:
        A cache to pass as ``cache_params=`` to ``hf_model(...)`` or ``hf_model.generate(...)``. Continue it one
        token per call (see the module docstring for the routes that are exact).
    """
    from transformers import DynamicCache

    arch = hf_arch(hf_model)
    if state.arch != arch:
        raise StateMismatchError(f"state is {state.arch} but the transformers model is {arch}")
    L, (C, K), ssm_shape = _expected(hf_model)
    if state.num_layers != L:
        raise StateMismatchError(f"state has {state.num_layers} layers, the transformers model {L}")
    if tuple(state.conv.shape[2:]) != (C, K - 1) or tuple(state.ssm.shape[2:]) != ssm_shape:
        raise StateMismatchError(
            f"state layout {state.layout} does not fit the transformers model "
            f"(conv [{C}, {K - 1}], ssm {list(ssm_shape)})"
        )
    dtype = dtype or state.dtype
    cache = DynamicCache(config=hf_model.config)
    for layer in range(L):
        conv = F.pad(state.conv[layer].to(dtype), (1, 0))  # the oldest of K columns never reaches an output
        cache.update_conv_state(conv, layer, conv_kernel_size=K)
        cache.update_recurrent_state(state.ssm[layer].to(dtype).clone(), layer)
    return cache


def from_hf_cache(
    cache: Any,
    model: Any,
    *,
    n_tokens: int,
    sum_delta: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> State:
    """A statelab ``State`` from a transformers Mamba/Mamba2 cache (copies the tensors).

    Args:
        cache: the ``cache_params`` of a transformers Mamba model after some tokens (e.g. ``out.cache_params``).
        model: the statelab model (``StatefulLM``) loaded from the same checkpoint; gives the fingerprint and
            the layout the state must have.
        n_tokens: how many tokens the cache has consumed (transformers does not record it).
        sum_delta: ``[L, B, D|H]`` ΣΔ if known; default NaN ("unknown": ordered composition will refuse it).
        dtype: dtype of ``ssm`` and ``conv`` (default: the cache's).
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        raise StateMismatchError("expected a transformers cache with layers (out.cache_params), got an empty one")
    width = model.zero_state(1, device="meta").conv.shape[-1]  # K - 1
    conv, ssm = [], []
    for i, layer in enumerate(layers):
        c = layer.conv_states.get(0) if hasattr(layer, "conv_states") else None
        h = layer.recurrent_states.get(0) if hasattr(layer, "recurrent_states") else None
        if c is None or h is None or not layer.has_previous_state.get(0, False):
            raise StateMismatchError(f"transformers cache layer {i} holds no conv/SSM state (was the cache filled?)")
        if c.shape[-1] < width:
            raise StateMismatchError(f"transformers cache layer {i} keeps {c.shape[-1]} conv columns, need {width}")
        conv.append(c[..., c.shape[-1] - width :])  # the newest K - 1 (a recording cache may keep more)
        ssm.append(h)
    conv_t, ssm_t = torch.stack(conv), torch.stack(ssm)
    dtype = dtype or ssm_t.dtype
    L, B = ssm_t.shape[:2]
    ref = model.zero_state(B, dtype=dtype, device=ssm_t.device)
    if sum_delta is None:
        sum_delta = torch.full_like(ref.sum_delta, math.nan)
    state = State(
        arch=model.arch,
        ssm=ssm_t.to(dtype).clone(),
        conv=conv_t.to(dtype).clone(),
        sum_delta=sum_delta.to(device=ssm_t.device, dtype=torch.float32).clone(),
        n_tokens=int(n_tokens),
        fingerprint=model.fingerprint,
    )
    model.check_state(state)
    return state


@torch.no_grad()
def hf_step(hf_model: Any, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Feed ``input_ids [B, T]`` into ``cache`` one token per call (the exact route); returns logits ``[B, T, V]``.

    ``cache`` is updated in place (it is a transformers object); it then holds the state after the tokens.
    """
    out = []
    for t in range(input_ids.shape[1]):
        o = hf_model(input_ids[:, t : t + 1], cache_params=cache, use_cache=True)
        out.append(o.logits[:, -1])
    return torch.stack(out, dim=1)


@torch.no_grad()
def hf_generate(
    hf_model: Any, input_ids: torch.Tensor, state: State | None = None, **generate_kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """transformers ``generate`` continuing from a statelab ``state``: ``(new_tokens [B, n], cache)``.

    The prompt ``input_ids [B, T]`` (``T >= 1``) is read after ``state``: all but its last token one per call,
    then ``hf_model.generate`` starts from the last token with the cache (its first step is a one-token call,
    so the whole route is exact). Without ``state`` it is a plain ``generate``. ``generate_kwargs`` go to
    ``generate`` (``max_new_tokens``, ``do_sample``, ...). The returned cache holds the state after the prompt
    and the generated tokens except the last one (transformers does not feed the last token back).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    kwargs = {"do_sample": False, "pad_token_id": 0, **generate_kwargs}
    if state is None:
        out = hf_model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), return_dict_in_generate=True, **kwargs
        )
        return out.sequences[:, input_ids.shape[1] :], out.past_key_values
    if state.batch_size != input_ids.shape[0]:
        raise StateMismatchError(
            f"state has batch size {state.batch_size} but input_ids has {input_ids.shape[0]}; use state.expand(n)"
        )
    cache = to_hf_cache(state, hf_model, dtype=next(hf_model.parameters()).dtype)
    hf_step(hf_model, input_ids[:, :-1], cache)
    last = input_ids[:, -1:]
    seq = hf_model.generate(last, cache_params=cache, attention_mask=torch.ones_like(last), **kwargs)
    return seq[:, 1:], cache
