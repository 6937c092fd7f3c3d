"""The state an evaluation or a request starts from: nothing, a stored skill, or a soup of stored skills.

Every entry point that runs a model "with a skill" (``statelab eval``, the lm-eval adapter, the server) resolves
its start state here, so they all accept the same things and refuse the same things with the same messages:

* ``skill="NAME"``: the store entry ``NAME`` (by name, or by id when the name is all digits), verified (checksum)
  and checked against the model: a state made by another model is a ``StateMismatchError`` naming both
  fingerprints. A state made by the same checkpoint loaded in another dtype is refused too, unless ``adopt=True``
  (then it is cast to this model's state dtype with ``model.adopt_state``).
* ``soup=["A", "B", ...]`` (or the string ``"A+B"``): those entries, each checked the same way, mixed with
  :func:`statelab.mix` (``mix="mean"`` by default, ``weights`` one per entry). Ordered methods (``adecay``,
  ``append``, ``hybrid``, ``picaso_*``) get the model's decay ``A``.
* neither: ``None``, i.e. the zero state.

The result is one row (batch 1) on the model's device; callers ``expand`` it to their batch.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from statelab.errors import ConfigError, StateMismatchError, StoreError
from statelab.state.core import State

__all__ = ["start_state", "parse_soup", "parse_weights", "open_store"]


def parse_soup(text: str) -> list[str]:
    """``"A+B+C"`` -> ``["A", "B", "C"]`` (spaces around names are dropped).

    ``+`` separates entries because lm-eval's ``--model_args`` already uses commas between arguments.

    Raises:
        ConfigError: an empty text or an empty name (``"A++B"``, ``"A+"``).
    """
    if not isinstance(text, str):
        raise ConfigError(f"a soup is written NAME+NAME, got {type(text).__name__}")
    names = [n.strip() for n in text.split("+")]
    if not text.strip() or any(not n for n in names):
        raise ConfigError(f"a soup is written NAME+NAME with non-empty names, got {text!r}")
    return names


def parse_weights(text: str) -> list[float]:
    """``"0.7+0.3"`` or ``"0.7,0.3"`` -> ``[0.7, 0.3]``.

    Raises:
        ConfigError: a part that is not a number.
    """
    parts = [p.strip() for p in text.replace(",", "+").split("+")]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"weights are numbers separated by '+' or ',', got {text!r}") from None


def open_store(store: Any) -> Any:
    """A ``StateStore`` from a store or a path to an existing store directory.

    A path is never created here: a misspelt ``--store`` must be an error, not a new empty store.

    Raises:
        StoreError: no store at that path.
    """
    from statelab.state.store import StateStore

    if isinstance(store, StateStore):
        return store
    if not isinstance(store, str | os.PathLike):
        raise StoreError(f"store must be a StateStore or a path, got {type(store).__name__}")
    path = Path(store)
    if not (path / "store.db").is_file():
        raise StoreError(
            f"no state store at {path} (a store directory holds store.db); create one with `statelab store add`"
        )
    return StateStore(path)


def _entry_state(store: Any, name: str, model: Any, adopt: bool) -> State:
    """Entry ``name`` of ``store``, checked against ``model`` (adopted from a sibling dtype when ``adopt``) and
    moved to its device."""
    if not isinstance(name, str | int) or isinstance(name, bool) or (isinstance(name, str) and not name.strip()):
        raise StoreError(f"a skill is named by a non-empty store entry name, got {name!r}")
    if name not in store:
        raise StoreError(f"no skill named {name!r} in store {store.path}; see `statelab store list {store.path}`")
    state = store.get(name).to(device=model.device)
    if state.fingerprint != model.fingerprint:
        sibling = model.sibling_dtype(state.fingerprint)
        if sibling is not None and adopt:
            return model.adopt_state(state)
        fix = "encode the skill again with this model"
        if sibling is not None:
            fix = (
                f"it was made by this checkpoint loaded in {sibling}: load the model in {sibling}, or adopt the "
                "skill (adopt=True; the lm-eval adapter does)"
            )
        raise StateMismatchError(
            f"skill {name!r} was made by model {state.fingerprint}, but this model's fingerprint is "
            f"{model.fingerprint}; {fix}"
        )
    model.check_state(state, batch_size=1)
    return state


def start_state(
    model: Any,
    *,
    store: Any = None,
    skill: str | None = None,
    soup: Sequence[str] | str | None = None,
    mix: str = "mean",
    weights: Sequence[float] | None = None,
    adopt: bool = False,
) -> State | None:
    """The state every request starts from (see the module doc).

    Args:
        model: a statelab model (``StatefulLM``).
        store: a ``StateStore`` or the path of an existing store; needed with ``skill`` or ``soup``.
        skill: one store entry name.
        soup: store entry names (a list, or one ``"A+B"`` string), mixed with ``mix``.
        mix: a mixing method of :data:`statelab.MIX_METHODS` (soups only).
        weights: one weight per soup entry (soups only; ``None`` = the method's default).
        adopt: take over entries made by the same checkpoint loaded in another dtype (``model.adopt_state``:
            cast to this model's state dtype); without it they are refused, naming the dtype.

    Returns:
        ``None`` (neither given: the zero state) or a batch-1 ``State`` of ``model`` on its device.

    Raises:
        ConfigError: both ``skill`` and ``soup``; ``weights`` or a non-default ``mix`` without a soup; an empty
            soup; an unknown mixing method; weights that do not fit.
        StoreError: no store given or found; an entry that does not exist (named in the message).
        StateMismatchError: an entry made by another model (both fingerprints named) or of another layout/dtype.
    """
    if skill is not None and soup is not None:
        raise ConfigError("give a skill or a soup, not both")
    if soup is None and (weights is not None or mix != "mean"):
        raise ConfigError("mix and weights apply to a soup; give soup=NAME+NAME as well")
    if skill is None and soup is None:
        return None
    if store is None:
        raise StoreError("a skill or soup is read from a state store; give the store (-s/--store, store=PATH)")
    st = open_store(store)
    if skill is not None:
        return _entry_state(st, skill, model, adopt)

    from statelab.state.mix import MIX_METHODS
    from statelab.state.mix import mix as mix_states

    names = parse_soup(soup) if isinstance(soup, str) else list(soup)  # type: ignore[arg-type]
    if not names:
        raise ConfigError("a soup needs at least one store entry")
    fn = MIX_METHODS.get(mix) if isinstance(mix, str) else None
    if fn is None:
        raise ConfigError(f"unknown mixing method {mix!r}; known: {', '.join(sorted(MIX_METHODS))}")
    if weights is not None and len(weights) != len(names):
        raise ConfigError(f"a soup of {len(names)} entries needs {len(names)} weights, got {len(weights)}")
    states = [_entry_state(st, n, model, adopt) for n in names]
    options: dict[str, Any] = {}
    if "A" in inspect.signature(fn).parameters:
        options["A"] = model.decay_A().detach()
    out = mix_states(states, mix, weights, **options)
    model.check_state(out, batch_size=1)
    return out
