"""Sequence operators, each with a naive fp32 reference beside its fast path (same signature)."""

__all__: list[str] = []
