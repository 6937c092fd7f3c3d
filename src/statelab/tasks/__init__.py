"""Task generators: pure functions of (config, seed)."""

__all__: list[str] = []
