"""tiermem traces: formats, generators, replay and tuning."""

__all__: list[str] = []
