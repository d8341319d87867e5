"""Checks of a run's settings that need neither data nor a model, done before any heavy work."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig

from uap_lightning.attacks import ThreatModel, build_engine, engine_options


class ConfigError(ValueError):
    """A setting that cannot work, found before any heavy work."""


def resolve_threat(cfg: DictConfig) -> ThreatModel:
    """The run's threat model: ``attack.eps``, or the data preset's default ε for ``attack.p``."""
    try:
        p_name = ThreatModel.parse(1.0, cfg.attack.p).p_name
    except ValueError as err:
        raise ConfigError(str(err)) from err
    eps = cfg.attack.eps
    if eps is None:
        defaults = cfg.data.default_eps or {}
        if p_name not in defaults:
            raise ConfigError(
                f"attack.eps is not set and data={cfg.data.name} has no default ε for p={p_name}; "
                f"set attack.eps=<ε in 0–255 pixel units>"
            )
        eps = defaults[p_name]
    try:
        return ThreatModel.parse(eps, cfg.attack.p)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def attack_options(cfg: DictConfig) -> Dict[str, Any]:
    """Keyword options of the engine named by ``attack.method``, taken from the ``attack`` config."""
    try:
        names = engine_options(cfg.attack.method)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return {name: cfg.attack[name] for name in names if name in cfg.attack}


def validate(cfg: DictConfig) -> ThreatModel:
    """Check every setting that can be checked without data or a model; return the threat model."""
    threat = resolve_threat(cfg)
    if not 0.0 < cfg.attack.delta < 1.0:
        raise ConfigError(f"attack.delta must lie in (0, 1); got {cfg.attack.delta}")
    if cfg.attack.max_passes < 1:
        raise ConfigError(f"attack.max_passes must be at least 1; got {cfg.attack.max_passes}")
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise ConfigError(f"model.checkpoint={cfg.model.checkpoint} is not a file; give the path of your weights")
    target = cfg.attack.target_class
    if target is not None and (target < 0 or (cfg.data.num_classes is not None and target >= cfg.data.num_classes)):
        raise ConfigError(f"attack.target_class={target} is not a class of data={cfg.data.name}")
    try:
        build_engine(cfg.attack.method, threat, **attack_options(cfg))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"attack settings do not fit attack.method={cfg.attack.method}: {err}") from err
    return threat
