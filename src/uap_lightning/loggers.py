"""The stack's own loggers and callbacks, from ``_target_`` configs (the ``logger`` and ``callbacks``
groups, as in the Lightning-Hydra template).

``logger`` maps names to logger configs (``logger=[tensorboard,csv]`` composes two); each phase of
a run (victim training, the attack, a task's report) gets its own instance, told apart by the
logger's own run name (TensorBoard and CSV: ``<run dir>/<name>/<phase>``; wandb: the run's name;
MLflow: the run name). ``callbacks`` maps names to callback configs: Lightning callbacks go to
the Trainer that trains the victim, any other object to the attack's Fabric (its
``on_attack_start``/``on_attack_pass_end``/``on_passes_done``/``on_attack_end`` hooks).

Only classes of an allow-list of packages are instantiated (:func:`check_targets`): a config file
names a class to build, and a class can run code when built.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.loggers import Logger

from uap_lightning.errors import ConfigError

# Packages whose classes a ``_target_`` in a logger or callback config may name.
ALLOWED_TARGET_PACKAGES = ("lightning.pytorch.loggers.", "lightning.fabric.loggers.", "lightning.pytorch.callbacks.",
                           "uap_lightning.")
# The argument of each logger class that names the run of one phase.
PHASE_ARGUMENTS = {"TensorBoardLogger": "version", "CSVLogger": "version", "WandbLogger": "name",
                   "MLFlowLogger": "run_name"}


def check_targets(group: str, configs: Mapping[str, Any]) -> None:
    """ConfigError naming ``<group>.<name>`` for an entry without a ``_target_`` or whose class lies
    outside :data:`ALLOWED_TARGET_PACKAGES`."""
    for name, config in (configs or {}).items():
        target = config.get("_target_") if isinstance(config, Mapping) else None
        if not isinstance(target, str):
            raise ConfigError(f"{group}.{name} needs a _target_: the class to build")
        if not target.startswith(ALLOWED_TARGET_PACKAGES):
            raise ConfigError(
                f"{group}.{name}._target_={target} is not allowed: {group} entries may build classes of "
                f"{', '.join(p.rstrip('.') for p in ALLOWED_TARGET_PACKAGES)} only"
            )


def instantiate_loggers(configs: Mapping[str, Any], phase: str) -> List[Logger]:
    """One logger per entry of ``configs`` (the ``logger`` group), each naming its run ``phase``."""
    check_targets("logger", configs)
    loggers = []
    for config in (configs or {}).values():
        argument = PHASE_ARGUMENTS.get(str(config["_target_"]).rsplit(".", 1)[-1])
        loggers.append(instantiate(config, **({argument: phase} if argument else {})))
    return loggers


def instantiate_callbacks(configs: Mapping[str, Any]) -> Dict[str, List[Any]]:
    """The ``callbacks`` group built: ``{"training": [Lightning callbacks], "attack": [the others]}``."""
    check_targets("callbacks", configs)
    built = [instantiate(config) for config in (configs or {}).values()]
    return {
        "training": [c for c in built if isinstance(c, L.Callback)],
        "attack": [c for c in built if not isinstance(c, L.Callback)],
    }
