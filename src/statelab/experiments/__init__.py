"""Experiments: typed configs, a runner per study and its report."""

__all__: list[str] = []
