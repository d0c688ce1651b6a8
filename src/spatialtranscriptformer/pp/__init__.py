"""Preprocessing: tiles, backbone embeddings, gene selection and pathway targets."""

__all__: list[str] = []
