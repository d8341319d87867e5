"""Universal adversarial perturbations (Moosavi-Dezfooli et al., CVPR 2017) on PyTorch."""

from uap_lightning.api import compute_uap, fooling_rate

__version__ = "0.1.0"

__all__ = ["compute_uap", "fooling_rate", "__version__"]
