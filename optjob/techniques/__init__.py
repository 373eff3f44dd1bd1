"""Technique plug-ins. Each module registers one ``Technique`` subclass on import."""

from __future__ import annotations

import importlib
import pkgutil

_loaded = False


def load_all() -> None:
    """Import every technique module once so its ``@register`` runs."""
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
        importlib.import_module(info.name)
    _loaded = True
