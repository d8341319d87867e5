"""The files a run leaves in its run dir.

``perturbation.pt`` and the figures are written first and ``metrics.json`` last, each
atomically, so a run that dies midway never leaves a ``metrics.json`` that looks complete.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from matplotlib.figure import Figure
from torch import Tensor

from uap_lightning.atomic import atomic_write, atomic_write_text
from uap_lightning.perturbation_io import write_perturbation_npy
from uap_lightning.progress import Phase
from uap_lightning.report.figures import save_figure
from uap_lightning.rundir import METRICS_FILE
from uap_lightning.threads import thread_reason

PERTURBATION_FILE = "perturbation.pt"
PERTURBATION_NPY = "perturbation.npy"  # H×W×C in 0–255 units, the form others publish in

log = logging.getLogger(__name__)


def write_metrics(run_dir: str | Path, metrics: Dict[str, Any]) -> Path:
    """Write ``metrics.json`` atomically (tensors to numbers, infinities to strings). Metrics that
    record ``threads`` get ``threads_reason`` too (added to ``metrics``): why the run used that many
    (``2 cores free``, ``1 of 2 cores busy``, ``threads=1``), when this process set them."""
    if "threads" in metrics and "threads_reason" not in metrics:
        reason = thread_reason(int(metrics["threads"]))
        if reason is not None:
            metrics["threads_reason"] = reason
    return write_json(Path(run_dir) / METRICS_FILE, metrics)


def write_json(path: str | Path, content: Dict[str, Any]) -> Path:
    """Write ``content`` as indented JSON at ``path``, atomically (tensors to numbers, infinities
    and NaN to strings); return the path."""
    atomic_write_text(path, json.dumps(json_safe(content), indent=2) + "\n")
    return Path(path)


def write_run_outputs(
    run_dir: str | Path, perturbation: Tensor, figures: Mapping[str, Figure], metrics: Dict[str, Any]
) -> Dict[str, Path]:
    """Write the perturbation (``perturbation.pt``: C×H×W, [0,1] scale; ``perturbation.npy``: H×W×C,
    0–255 units, float32), each figure as ``<name>.png``, then metrics.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a stale file must not outlive a failed rerun
    paths = {PERTURBATION_FILE: run_dir / PERTURBATION_FILE, PERTURBATION_NPY: run_dir / PERTURBATION_NPY}
    v = perturbation.detach().cpu().float().contiguous()
    atomic_write(paths[PERTURBATION_FILE], lambda f: torch.save(v, f))
    write_perturbation_npy(paths[PERTURBATION_NPY], v)
    paths.update(write_figures(run_dir, figures))
    paths[METRICS_FILE] = write_metrics(run_dir, metrics)
    return paths


def write_figures(run_dir: str | Path, figures: Mapping[str, Figure]) -> Dict[str, Path]:
    """Write each figure as ``<name>.png`` (200 dpi) and ``<name>.pdf`` in ``run_dir``; return the PNG
    paths by file name. While that takes long, a log line every few seconds names the figure."""
    paths = {}
    with Phase(log, f"writing {len(figures)} figure{'s' if len(figures) != 1 else ''}") as writing:
        for number, (name, figure) in enumerate(figures.items(), 1):
            writing.part(f"{name}.png and {name}.pdf, {number} of {len(figures)}")
            paths[f"{name}.png"] = Path(run_dir) / f"{name}.png"
            save_figure(figure, paths[f"{name}.png"])
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
