"""A pass's record and perturbation in the run's loggers (scalars under ``attack/``, v as an
image on the fixed colour scale of :mod:`~uap_lightning.report.colour_scale`)."""

from __future__ import annotations

from typing import Any, Callable, Dict

from lightning.fabric import Fabric
from torch import Tensor

from uap_lightning.attacks import ThreatModel
from uap_lightning.report.colour_scale import perturbation_image

PassLogger = Callable[[Dict[str, Any], Tensor], None]  # (a pass's record, v after it)


def log_pass(fabric: Fabric, threat: ThreatModel, record: Dict[str, Any], v: Tensor) -> None:
    """Log a pass's ``record`` (scalars) and ``v`` (C×H×W, [0,1] scale; an image) at step
    ``record["pass"]`` to ``fabric``'s loggers."""
    step = record["pass"]
    fabric.log_dict({f"attack/{key}": value for key, value in record.items() if key != "pass"}, step=step)
    image = None
    for logger in fabric.loggers:
        experiment: Any = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            if image is None:
                image = perturbation_image(v.detach().cpu(), threat)
            experiment.add_image("attack/perturbation", image, step)
