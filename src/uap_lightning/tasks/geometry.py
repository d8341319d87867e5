"""The geometry task (``task=geometry``, the paper's §4 and Fig. 9): why universal perturbations
exist.

The normals to the decision boundary near the images of X (DeepFool's minimal ℓ2 perturbations,
normalised) are stacked as the d×n matrix N. Their singular values are compared with those of as
many random unit vectors, and the fooling rate on the eval set of a random vector of norm ε drawn
from the span of N's top-k singular vectors (k of ``task.ks``) with that of a random vector of the
same norm drawn from the whole space, each the mean of ``task.draws`` seeded draws. For p ≠ 2 each
vector is drawn uniformly on the unit ℓ2 sphere of its space and then scaled to ‖·‖p = ε (the
paper's setting is ℓ2): the vectors compared then share their ℓp norm but not their ℓ2 norm, which
a warning gives. Writes ``geometry.csv`` (a row per k), ``geometry.png``, ``geometry.pdf``
and ``metrics.json``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write_text
from uap_lightning.attacks import AttackSettings
from uap_lightning.attacks.deepfool import DeepFoolOptions
from uap_lightning.attacks.geometry import (
    BoundaryNormals,
    boundary_normals,
    principal_subspace,
    random_direction,
    random_unit_vectors,
    scaled_to_norm,
    singular_values,
)
from uap_lightning.errors import ConfigError, UserError
from uap_lightning.progress import Phase
from uap_lightning.report.geometry_figure import geometry_figure
from uap_lightning.rundir import move_aside
from uap_lightning.task_configs import GeometryTaskConfig
from uap_lightning.tasks.setup import Setup, Task
from uap_lightning.units import to_pixel_units

log = logging.getLogger(__name__)

GEOMETRY_FIGURE = "geometry"  # geometry.png and geometry.pdf
GEOMETRY_CSV = "geometry.csv"


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """The subspace dimensions, the draws, the number of images and the batch are positive; untargeted."""
    ks = list(cfg.task.ks)
    if not ks or any(int(k) < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ConfigError(f"task.ks must list distinct subspace dimensions k >= 1, e.g. task.ks=[50,100,200]; got {ks}")
    if int(cfg.task.draws) < 1:
        raise ConfigError(f"task.draws must be at least 1 (random vectors per k); got {cfg.task.draws}")
    if cfg.task.images is not None and int(cfg.task.images) < 1:
        raise ConfigError(f"task.images must be at least 1, or null for all of X; got {cfg.task.images}")
    if cfg.task.batch_size is not None and int(cfg.task.batch_size) < 1:
        raise ConfigError(
            f"task.batch_size must be at least 1, or null for attack.eval_batch_size; got {cfg.task.batch_size}"
        )
    if attack.target_class is not None:
        raise ConfigError("task=geometry studies the untargeted decision boundaries; unset attack.target_class")


def _deepfool_options(attack: AttackSettings) -> Dict[str, Any]:
    """DeepFool's candidates, overshoot and iterations: the run's ``attack.*`` keys where its engine
    has them, the defaults of the authors' code otherwise."""
    options = attack.options
    return {
        "num_candidates": int(options.get("num_candidates", DeepFoolOptions.num_candidates)),
        "overshoot": float(options.get("overshoot", DeepFoolOptions.overshoot)),
        "max_iters": int(options.get("max_deepfool_iters", DeepFoolOptions.max_deepfool_iters)),
    }


def _rates(setup: Setup, net: nn.Module, clean: Tensor, directions: List[Tensor]) -> Tuple[List[float], float]:
    """Eval-set fooling rate of each unit direction (d,) scaled to the run's ℓp norm ε, and the
    mean ℓ2 norm of the scaled vectors (0–255 units)."""
    shape = setup.eval_images.shape[1:]
    threat = setup.threat
    vectors = [scaled_to_norm(u, threat.radius, threat.p).float().view(shape) for u in directions]
    rates = [metrics.fooling_rate(clean, setup.predict(net, setup.eval_images, v)) for v in vectors]
    l2 = statistics.fmean(to_pixel_units(float(torch.linalg.vector_norm(v))) for v in vectors)
    return rates, l2


def _unequal_energy_warning(threat: Any, whole_l2: float, subspace_l2: Dict[int, float]) -> str:
    """For p ≠ 2: the vectors compared share their ℓp norm ε, not their ℓ2 norm (the measured means
    of each), and what to run for a comparison at equal ℓ2 energy."""
    subspace = ", ".join(f"{l2:.1f} (k={k})" for k, l2 in subspace_l2.items())
    return (
        f"under {threat.symbol} the vectors compared have the same {threat.symbol} norm ε={threat.eps:g} but not the "
        f"same ℓ2 norm: mean ℓ2 norm {whole_l2:.1f} for the whole space vs {subspace} for the top-k subspace "
        "(0–255 units), so their fooling rates are not compared at equal ℓ2 energy; for an equal-energy "
        "comparison (the paper's setting) run with attack.p=2 (and attack.eps an ℓ2 radius)"
    )


def _summary(rates: List[float]) -> Dict[str, Any]:
    return {"mean": statistics.fmean(rates), "std": statistics.pstdev(rates), "rates": rates}


def run(setup: Setup) -> Dict[str, Any]:
    """Normals on X, singular values, fooling rates of subspace and whole-space vectors; the
    table, the figure and metrics.json."""
    cfg, threat = setup.cfg, setup.threat
    draws = int(cfg.task.draws)
    images = _normals_images(setup)
    move_aside(setup.output_dir)
    net = setup.victim().net
    normals = _boundary_normals(setup, net, images)
    n, d = normals.found.normals.shape
    generator = torch.Generator().manual_seed(setup.seed)
    normal_values = singular_values(normals.found.normals)
    random_values = singular_values(random_unit_vectors(n, d, generator))

    ks = sorted({min(int(k), n, d) for k in cfg.task.ks})
    if ks != sorted(int(k) for k in cfg.task.ks):
        log.warning("task.ks capped at min(n, d) = %d (n normals in d dimensions): k = %s", min(n, d), ks)
    if threat.p != 2.0:
        log.info(
            "each random vector is drawn on the unit ℓ2 sphere of its space, then scaled to %s norm ε=%g",
            threat.symbol,
            threat.eps,
        )
    clean = setup.predict(net, setup.eval_images)
    whole_rates, whole_l2 = _rates(setup, net, clean, [random_direction(d, generator) for _ in range(draws)])
    whole = _summary(whole_rates)
    rows: List[Dict[str, Any]] = []
    subspace_l2: Dict[int, float] = {}
    for k in ks:
        basis = principal_subspace(normals.found.normals, k)
        rates, subspace_l2[k] = _rates(setup, net, clean, [random_direction(d, generator, basis) for _ in range(draws)])
        energy = float(normal_values[:k].square().sum() / normal_values.square().sum())
        random_energy = float(random_values[:k].square().sum() / random_values.square().sum())
        rows.append({"k": k, "subspace": _summary(rates), "normals_energy": energy, "random_energy": random_energy})
    if threat.p != 2.0:
        log.warning("%s", _unequal_energy_warning(threat, whole_l2, subspace_l2))

    figure = geometry_figure(
        normal_values.tolist(),
        random_values.tolist(),
        ks,
        [row["subspace"]["mean"] for row in rows],
        [row["subspace"]["std"] for row in rows],
        whole["mean"],
        whole["std"],
        draws=draws,
        normals_label=f"{n} boundary normals of {cfg.model.name} on {cfg.data.name} (d={d})",
        vectors_label=f"random vectors of {threat.symbol} norm ε={threat.eps:g} (0–255 units)",
    )
    results = {
        "n_normals": n,
        "n_dropped": normals.found.dropped,
        "normals_images": len(images),
        "dimension": d,
        "singular_values_normals": normal_values.tolist(),
        "singular_values_random": random_values.tolist(),
        "subspace_fooling_rate": {str(row["k"]): row["subspace"] for row in rows},
        "whole_space_fooling_rate": whole,
        "normals_energy": {str(row["k"]): row["normals_energy"] for row in rows},
        "random_energy": {str(row["k"]): row["random_energy"] for row in rows},
        "ks": ks,
        "draws": draws,
        "deepfool": normals.options,
        "deepfool_batch_size": normals.batch_size,
        "deepfool_seconds": normals.seconds,
        "vector_norm": (
            f"{threat.symbol} norm ε"
            if threat.p == 2.0
            else f"uniform on the unit ℓ2 sphere of the space, then scaled to {threat.symbol} norm ε"
        ),
        "clean_accuracy": metrics.accuracy(clean, setup.eval_labels_for(setup.victim())),
    }
    title = (
        f"fooling rate on {len(setup.eval_images)} eval images of random {threat.symbol} vectors of norm "
        f"ε={threat.eps:g} from the top-k singular subspace of {n} boundary normals vs the whole space "
        f"(mean ± std of {draws} draws)"
    )
    table = _table(rows, whole)
    atomic_write_text(setup.output_dir / GEOMETRY_CSV, table.to_csv())
    return setup.finish(results, title, table, figures={GEOMETRY_FIGURE: figure})


def _normals_images(setup: Setup) -> Tensor:
    """The images whose boundary normals are computed: X, or the first ``task.images`` of it."""
    wanted = setup.cfg.task.images
    if wanted is None:
        return setup.attack_images
    if int(wanted) > len(setup.attack_images):
        raise ConfigError(
            f"task.images={wanted} exceeds X's {len(setup.attack_images)} images; "
            f"lower task.images or raise data.attack_images"
        )
    images, _ = setup.attack_set(int(wanted))
    return images


@dataclass
class _Normals:
    """The boundary normals found (:func:`boundary_normals`), with the DeepFool ``options`` and
    ``batch_size`` that found them in ``seconds``."""

    found: BoundaryNormals
    options: Dict[str, Any]
    batch_size: int
    seconds: float


def _boundary_normals(setup: Setup, net: nn.Module, images: Tensor) -> _Normals:
    """The normals of ``net``'s decision boundary at ``images`` by batched DeepFool (the attack's
    options), logged and timed; UserError when DeepFool converged on fewer than two."""
    options = _deepfool_options(setup.attack)
    log.info(
        "normals  DeepFool (%d candidates, overshoot %g) on %d images of X ...",
        options["num_candidates"],
        options["overshoot"],
        len(images),
    )
    task_batch = setup.cfg.task.batch_size
    batch_size = setup.attack.eval_batch_size if task_batch is None else int(task_batch)
    started = time.perf_counter()
    with Phase(log, "normals") as phase:
        found = boundary_normals(
            net,
            images,
            batch_size=batch_size,
            on_batch=lambda done, total: phase.part(f"{done} of {total} images of X done"),
            **options,
        )
    seconds = time.perf_counter() - started
    log.info(
        "normals  %d of %d images of X (DeepFool did not converge on %d) in %.1f s",
        found.count,
        len(images),
        found.dropped,
        seconds,
    )
    if found.count < 2:
        raise UserError(
            f"DeepFool converged on {found.count} of {len(images)} images of X, too few to study their normals; "
            f"raise attack.max_deepfool_iters or task.images"
        )
    return _Normals(found, options, batch_size, seconds)


def _table(rows: List[Dict[str, Any]], whole: Dict[str, float]) -> pd.DataFrame:
    """geometry.csv: per k the subspace's and the whole space's fooling rates (mean, std), their
    ratio, and the share of the normals' and of random vectors' energy in the top k."""
    return pd.DataFrame(
        {
            "k": [row["k"] for row in rows],
            "subspace": [row["subspace"]["mean"] for row in rows],
            "subspace std": [row["subspace"]["std"] for row in rows],
            "whole space": [whole["mean"]] * len(rows),
            "whole space std": [whole["std"]] * len(rows),
            "ratio": [row["subspace"]["mean"] / whole["mean"] if whole["mean"] > 0 else float("inf") for row in rows],
            "normals' energy in top k": [row["normals_energy"] for row in rows],
            "random's energy in top k": [row["random_energy"] for row in rows],
        }
    ).set_index("k")


TASK = Task("geometry", GeometryTaskConfig, run, check)
