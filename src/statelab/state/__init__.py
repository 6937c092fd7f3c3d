"""States as values: the ``State`` type, state files, the state store, retrieval and mixing."""

from statelab.state.core import State

__all__ = ["State"]
