"""ECE: explainable and efficient knowledge editing, as a reproducible DVC pipeline.

`ece.edit(...)` and `ece.evaluate(...)` are the programmatic API (ece/api.py). They are loaded on first
use, so that `import ece.<wing>.<module>` (every stage does) does not import the whole library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["edit", "evaluate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("ece.api"), name)
    raise AttributeError(f"module 'ece' has no attribute {name!r}")
