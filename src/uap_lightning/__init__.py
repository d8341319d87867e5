"""Universal adversarial perturbations (Moosavi-Dezfooli et al., CVPR 2017) on PyTorch."""

from typing import Any

from uap_lightning.threads import passive_openmp_wait

# Before torch loads its OpenMP runtime, which reads the wait policy once: waiting threads sleep
# instead of spinning on cores another job needs (OMP_WAIT_POLICY set by the user wins). Where
# torch was imported first, this changes only processes started later.
passive_openmp_wait()

from uap_lightning.api import compute_uap, fooling_rate  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Normalize", "compute_uap", "fooling_rate", "__version__"]


def __getattr__(name: str) -> Any:
    """``uap_lightning.Normalize``: the mean/std layer a victim puts first (loaded on first use, with the
    model package)."""
    if name == "Normalize":
        from uap_lightning.models.normalize import Normalize

        return Normalize
    raise AttributeError(f"module 'uap_lightning' has no attribute {name!r}")
