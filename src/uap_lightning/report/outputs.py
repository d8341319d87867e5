"""The files a run leaves in its run dir.

``perturbation.pt`` and the figures are written first and ``metrics.json`` last, each
atomically, so a run that dies midway never leaves a ``metrics.json`` that looks complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from matplotlib.figure import Figure
from torch import Tensor

from uap_lightning.atomic import atomic_write, atomic_write_text
from uap_lightning.report.figures import save_figure_png
from uap_lightning.rundir import METRICS_FILE

PERTURBATION_FILE = "perturbation.pt"


def write_metrics(run_dir: str | Path, metrics: Dict[str, Any]) -> Path:
    """Write ``metrics.json`` atomically (tensors to numbers, infinities to strings)."""
    path = Path(run_dir) / METRICS_FILE
    atomic_write_text(path, json.dumps(json_safe(metrics), indent=2) + "\n")
    return path


def write_run_outputs(
    run_dir: str | Path, perturbation: Tensor, figures: Mapping[str, Figure], metrics: Dict[str, Any]
) -> Dict[str, Path]:
    """Write the perturbation (C×H×W, [0,1] scale), each figure as ``<name>.png``, then metrics.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a stale file must not outlive a failed rerun
    paths = {PERTURBATION_FILE: run_dir / PERTURBATION_FILE}
    v = perturbation.detach().cpu().float().contiguous()
    atomic_write(paths[PERTURBATION_FILE], lambda f: torch.save(v, f))
    for name, figure in figures.items():
        paths[f"{name}.png"] = run_dir / f"{name}.png"
        save_figure_png(figure, paths[f"{name}.png"])
    paths[METRICS_FILE] = write_metrics(run_dir, metrics)
    return paths


def json_safe(value: Any) -> Any:
    """Plain JSON: tensors to numbers, infinities and NaN to strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
