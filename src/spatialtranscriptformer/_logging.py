"""The library logger (no handler is attached at import)."""

from __future__ import annotations

import logging

logger = logging.getLogger("spatialtranscriptformer")
