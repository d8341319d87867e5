"""The benchmark: ART, a naive reference and this project's engines, side by side in one process."""

from uap_lightning.bench.cli import main, run_bench

__all__ = ["main", "run_bench"]
