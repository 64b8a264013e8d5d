"""tiermem runtime: DLRM model, inference session, CLI."""

__all__: list[str] = []
