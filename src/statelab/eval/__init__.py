"""Evaluation: reference algorithms and metrics."""

__all__: list[str] = []
