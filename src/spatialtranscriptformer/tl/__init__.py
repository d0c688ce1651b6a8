"""Tools: fit models, predict expression and pathway scores, evaluate."""

__all__: list[str] = []
