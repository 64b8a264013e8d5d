"""tiermem: tiered embedding store and Numba SLS kernels."""

__all__: list[str] = []
