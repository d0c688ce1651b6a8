"""Models as plain :class:`torch.nn.Module` s (import torch lazily through this package)."""
