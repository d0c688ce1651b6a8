"""Plots (matplotlib; scanpy-style keyword-only options)."""

__all__: list[str] = []
