"""The registry of universal attack engines and the factory that builds one by name."""

from __future__ import annotations

import inspect
from typing import Dict, Tuple, Type

from uap_lightning.attacks.base import UniversalAttack
from uap_lightning.attacks.deepfool_uap import BatchedDeepFoolUAP, DeepFoolUAP
from uap_lightning.attacks.sgd_uap import SGDUAP
from uap_lightning.attacks.threat import ThreatModel

ENGINES: Dict[str, Type[UniversalAttack]] = {
    engine.name: engine for engine in (DeepFoolUAP, BatchedDeepFoolUAP, SGDUAP)
}


def engine_class(method: str) -> Type[UniversalAttack]:
    """The engine registered under ``method``; ValueError listing the known names otherwise."""
    try:
        return ENGINES[method]
    except KeyError:
        raise ValueError(f"attack.method must be one of {', '.join(sorted(ENGINES))}; got {method!r}") from None


def engine_options(method: str) -> Tuple[str, ...]:
    """Names of the keyword options the engine ``method`` accepts (clip and target_class included)."""
    names = []
    for cls in engine_class(method).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return tuple(names)


def build_engine(method: str, threat: ThreatModel, **options) -> UniversalAttack:
    """Engine ``method`` for ``threat`` with ``options``; an option the engine lacks raises TypeError."""
    cls = engine_class(method)
    known = engine_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"attack.method={method} does not take option(s) {', '.join(unknown)}; it takes {', '.join(known)}"
        )
    return cls(threat, **options)
