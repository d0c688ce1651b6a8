"""Progress bars (:mod:`tqdm`) that stay quiet where the notebook front end is missing.

:mod:`tqdm.auto` draws a widget in Jupyter when :mod:`ipywidgets` is installed and falls back to text
otherwise — but it first warns (``TqdmWarning: IProgress not found``) when the module is imported, whoever
imports it (here: :mod:`pooch`, imported by the data readers). The fallback is fine; the warning is noise
the user cannot act on from our code, so this module imports :mod:`tqdm.auto` once, when the package is
imported, with exactly that warning silenced. Nothing else is filtered.
"""

from __future__ import annotations

import warnings
from typing import Any


def import_tqdm_auto():
    """Import :mod:`tqdm.auto` with its "IProgress not found" notice silenced (and only that one)."""
    import sys

    if "tqdm.auto" in sys.modules:
        return sys.modules["tqdm.auto"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found", category=Warning)
        import tqdm.auto

    return tqdm.auto


def progress_bar(*, total: int | None = None, disable: bool = False, **kwargs: Any):
    """A :class:`tqdm.auto.tqdm` bar (a widget in Jupyter with ipywidgets, text otherwise)."""
    return import_tqdm_auto().tqdm(total=total, disable=disable, **kwargs)
