"""Victim models: the model zoo, the victim LightningModule, and weight loading."""

from .checkpoint import CheckpointMismatchError, load_weights
from .normalize import Normalize
from .pretrained import PretrainedWeightsNotFoundError
from .victim import VictimClassifier
from .zoo import MODEL_NAMES, build_backbone, output_classes

__all__ = [
    "MODEL_NAMES",
    "CheckpointMismatchError",
    "Normalize",
    "PretrainedWeightsNotFoundError",
    "VictimClassifier",
    "build_backbone",
    "load_weights",
    "output_classes",
]
