"""Mixer layers with the state API: ``y, new_state = layer(x, state=None)``."""

__all__: list[str] = []
