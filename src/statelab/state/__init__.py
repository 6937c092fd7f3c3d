"""States as values: the ``State`` type, state files, the state store, retrieval and mixing."""

from __future__ import annotations

from typing import Any

__all__ = ["State"]


def __getattr__(name: str) -> Any:
    # State is resolved on first use: the store's listing (statelab store list) and the command line import
    # statelab.state.* modules without torch
    if name == "State":
        from statelab.state.core import State

        return State
    raise AttributeError(f"module 'statelab.state' has no attribute {name!r}")
