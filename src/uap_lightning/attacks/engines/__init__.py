"""The engines, one module each, found by name: every module of this package is imported, and each
engine class registers itself (:func:`~uap_lightning.attacks.base.register_engine`), so adding an
engine is adding its module here (and its ``conf/attack/<name>.yaml``). The machinery they share
(threat model, projections, losses, DeepFool, Algorithm 1's outer loop, hooks, the pass driver,
distributed reductions) lives beside this package in :mod:`uap_lightning.attacks`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from uap_lightning.attacks.base import ENGINES, UniversalAttack, engine_class, register_engine
from uap_lightning.attacks.threat import ThreatModel


def import_engine_modules() -> None:
    """Import every module of this package, registering the engines they define."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def build_engine(method: str, threat: ThreatModel, **options: Any) -> UniversalAttack:
    """Engine ``method`` for ``threat`` with ``options`` (its own keys, ``clip`` and ``target_class``);
    ValueError for an unknown method, TypeError for an option the engine does not take."""
    return engine_class(method)(threat, **options)


__all__ = ["ENGINES", "build_engine", "engine_class", "import_engine_modules", "register_engine"]
