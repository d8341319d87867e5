"""The files a run leaves in its run dir.

``perturbation.pt``, ``perturbation.png`` and ``examples.png`` are written first and
``metrics.json`` last, each atomically, so a run that dies midway never leaves a
``metrics.json`` that looks complete.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Dict

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor

from uap_lightning.atomic import atomic_write, atomic_write_text
from uap_lightning.report.images import save_perturbation_png

METRICS_FILE = "metrics.json"
PERTURBATION_FILE = "perturbation.pt"
PERTURBATION_PNG = "perturbation.png"
EXAMPLES_PNG = "examples.png"


def write_run_outputs(
    run_dir: str | Path, perturbation: Tensor, examples: Figure, metrics: Dict[str, Any]
) -> Dict[str, Path]:
    """Write the perturbation (C×H×W, [0,1] scale), its picture, the examples grid and metrics.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: run_dir / name for name in (PERTURBATION_FILE, PERTURBATION_PNG, EXAMPLES_PNG, METRICS_FILE)}
    (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a stale file must not outlive a failed rerun
    v = perturbation.detach().cpu().float().contiguous()
    atomic_write(paths[PERTURBATION_FILE], lambda f: torch.save(v, f))
    buffer = io.BytesIO()
    save_perturbation_png(v, buffer, format="png")
    atomic_write(paths[PERTURBATION_PNG], lambda f: f.write(buffer.getvalue()))
    figure_bytes = io.BytesIO()
    examples.savefig(figure_bytes, format="png", dpi=100)
    plt.close(examples)
    atomic_write(paths[EXAMPLES_PNG], lambda f: f.write(figure_bytes.getvalue()))
    atomic_write_text(paths[METRICS_FILE], json.dumps(_json_safe(metrics), indent=2) + "\n")
    return paths


def _json_safe(value: Any) -> Any:
    """Plain JSON: tensors to numbers, infinities to strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
