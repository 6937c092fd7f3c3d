"""Exceptions statelab raises on bad input. Each message names what was expected and what was found."""

from __future__ import annotations

__all__ = [
    "StatelabError",
    "StateMismatchError",
    "CheckpointError",
    "StateFileError",
    "StoreError",
    "ConfigError",
    "StatelabWarning",
]


class StatelabError(Exception):
    """Base class of every error statelab raises on purpose."""


class StateMismatchError(StatelabError, ValueError):
    """A state does not fit the model or operation: other model, architecture, shape, dtype or batch size."""


class CheckpointError(StatelabError, ValueError):
    """A checkpoint directory cannot be read: unknown architecture, missing, extra or misshapen weights."""


class StateFileError(StatelabError, ValueError):
    """A saved state file is truncated, corrupt, fails its checksum or carries unexpected metadata."""


class StoreError(StatelabError, RuntimeError):
    """A state store operation failed; the store is left as it was before the call."""


class ConfigError(StatelabError, ValueError):
    """A config has an unknown key, a wrong type or an invalid value."""


class StatelabWarning(UserWarning):
    """Something statelab recovered from on its own and wants you to know about (e.g. a rebuilt index cache)."""
