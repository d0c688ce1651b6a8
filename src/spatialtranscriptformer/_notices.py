"""Notices raised inside third-party libraries on our code paths, which users cannot act on.

Each entry names one message, its category and the module that raises it, so no other warning is
affected (not even another warning of the same module). Registered once, when the package is imported.

- Lightning (``lightning.pytorch.utilities._pytree``) instantiates ``torch.utils._pytree.LeafSpec`` when
  it batches data in ``Trainer.fit``; torch >= 2.9 deprecates the class with a ``FutureWarning``
  ("`isinstance(treespec, LeafSpec)` is deprecated"). Lightning's code, not ours or the user's, must change.
"""

from __future__ import annotations

import warnings

THIRD_PARTY_NOTICES: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)
"""``(message regex, category, module regex)`` of each silenced notice."""


def silence_third_party_notices() -> None:
    """Ignore exactly the notices of :data:`THIRD_PARTY_NOTICES` (idempotent)."""
    for message, category, module in THIRD_PARTY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
