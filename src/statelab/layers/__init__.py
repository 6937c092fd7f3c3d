"""Mixer layers with one call shape, ``y, state = layer(x, state=None, *, positions=None, lengths=None,
segments=None)``, and the backend chosen when a layer is built (:mod:`statelab.layers.protocol`)."""

__all__: list[str] = []
