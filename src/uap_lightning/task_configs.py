"""The settings schema of every task (``task.*``, one dataclass per ``task=NAME``), in a module
free of Lightning: the command line composes and checks its settings against them before it
imports the tasks themselves. Each task module declares its own schema as its ``TASK``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from uap_lightning.attacks import ENGINES
from uap_lightning.bench_parts.rows import PEERS
from uap_lightning.config import TaskConfig


def bench_rows() -> List[str]:
    """Every row the benchmark can run: the peers, then every engine."""
    return [*PEERS, *ENGINES]


@dataclass
class AttackTaskConfig(TaskConfig):
    """Compute one universal perturbation and evaluate it (the default).

    The objective returned to Hydra sweepers is a fooling rate r, or, with a target fooling rate
    T, ε + 255·max(0, T − r)/T: ε itself once T is reached (to minimise). r never looks at the
    evaluation set: it is the rate on X (``selection=attack_set``), or on a part of X held out
    from the attack (``selection=holdout``: ``holdout_fraction`` of X, drawn with the attack seed)."""

    name: str = "attack"
    target_fooling_rate: Optional[float] = None
    selection: str = "attack_set"  # attack_set | holdout: the images the sweepers' objective is measured on
    holdout_fraction: float = 0.2  # selection=holdout: the share of X kept out of the attack


@dataclass
class BenchTaskConfig(TaskConfig):
    """Run ART, a naive reference and the engines side by side on one victim and one X."""

    name: str = "bench"
    rows: List[str] = field(default_factory=bench_rows)  # any of the peers and engines, in order
    # per-engine settings over the shared ``attack`` settings, e.g. {sgd_uap: {max_passes: 5}}
    engines: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    art_batch_size: int = 128  # ART's prediction batch size (its end-of-pass check runs at 1)
    efficiency_batches: int = 4  # batches of X timed for the batched engine's efficiency


@dataclass
class CompareTaskConfig(TaskConfig):
    """Engines × sources × seeds, each perturbation scored on every victim (a multirun: ``-m``)."""

    name: str = "compare"
    engines: List[str] = field(default_factory=lambda: ["sgd_uap", "gd_uap", "sga", "deepfool_uap"])  # attack presets
    # model presets the perturbations are computed on; a list of presets is an ensemble: [cnn,[cnn,lenet]]
    sources: List[Any] = field(default_factory=lambda: ["cnn", "lenet"])
    seeds: List[Any] = field(default_factory=lambda: [0, 1])  # attack seeds (attack.seed), integers
    # model presets (names of conf/model/*.yaml) or mappings {preset: NAME, <model key>: value, ...}
    victims: List[Any] = field(default_factory=lambda: ["cnn", "lenet"])
    # as task=transfer's: each pretrained victim sees image-file data at its declared input size
    native_sizes: bool = True


@dataclass
class EvaluateTaskConfig(TaskConfig):
    """Score one perturbation file (``perturbation.path``) on the run's victim and eval set."""

    name: str = "evaluate"


@dataclass
class FinetuneTaskConfig(TaskConfig):
    """Fine-tune the victim on images perturbed by a pool of universal perturbations, recomputed
    every round, and attack it afresh (the paper's §3 defence)."""

    name: str = "finetune"
    rounds: int = 2  # the pool is recomputed on the current network at the start of every round
    epochs: int = 3  # fine-tuning epochs per round
    pool_size: int = 4  # universal perturbations in the pool, each from its own draw of X
    probability: float = 0.5  # chance that a training image is perturbed by a pool member
    lr: Optional[float] = None  # fine-tuning learning rate; None: model.lr / 10


@dataclass
class GeneralisationTaskConfig(TaskConfig):
    """Fooling rate on the eval set against the size of X (the paper's Fig. 6)."""

    name: str = "generalisation"
    sizes: List[int] = field(default_factory=lambda: [50, 100, 200, 500, 1000])  # sizes of X, images


@dataclass
class GeometryTaskConfig(TaskConfig):
    """Boundary normals near X: their singular values, and random vectors in their top-k span."""

    name: str = "geometry"
    ks: List[int] = field(default_factory=lambda: [50, 100, 200])  # subspace dimensions, capped at min(n, d)
    draws: int = 5  # seeded random vectors per k and for the whole space
    images: Optional[int] = None  # images of X to compute normals for (a class-balanced part of X); null: all of X
    # images per batched DeepFool call; null: attack.eval_batch_size. On a CPU, 1 is fastest for large
    # victims (a batch iterates until its slowest image has crossed its boundary)
    batch_size: Optional[int] = None


@dataclass
class TransferTaskConfig(TaskConfig):
    """Score every perturbation on every victim (the paper's Table 2)."""

    name: str = "transfer"
    # model presets (names of conf/model/*.yaml) or mappings {preset: NAME, <model key>: value, ...}
    victims: List[Any] = field(default_factory=lambda: ["cnn", "lenet"])
    # perturbation files (read as ``perturbation`` says) or run folders holding perturbation.pt;
    # empty: compute one on each victim
    perturbations: List[str] = field(default_factory=list)
    # image-file data: each pretrained victim that declares its input size (EfficientNet-Lite1 240 px,
    # timm models) sees the photographs decoded at that size, and perturbations of another size are
    # resized to it (bilinear) and projected onto the ε-ball; false: every victim at data.image_size
    native_sizes: bool = True


TASK_SCHEMAS: Dict[str, type] = {
    "attack": AttackTaskConfig,
    "bench": BenchTaskConfig,
    "compare": CompareTaskConfig,
    "evaluate": EvaluateTaskConfig,
    "finetune": FinetuneTaskConfig,
    "generalisation": GeneralisationTaskConfig,
    "geometry": GeometryTaskConfig,
    "transfer": TransferTaskConfig,
}
