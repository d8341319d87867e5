"""Structured configs: the typed schema every Hydra run is validated against.

Each group of ``conf/`` (data, model, attack, trainer, logger, paths) is merged onto
one of these dataclasses, so an unknown key or a value of the wrong type fails at
composition with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConfig:
    """Where data is read and outputs and caches are written."""

    root_dir: str = "."
    data_dir: str = MISSING  # $UAP_DATA_DIR, else <cwd>/data
    cache_dir: str = MISSING  # trained victims and decoded datasets
    output_dir: str = MISSING  # the Hydra run dir of this job


@dataclass
class DataConfig:
    """A dataset preset. Images are float tensors in [0,1]; normalisation lives in the model."""

    name: str = MISSING  # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagefolder
    root: Optional[str] = None  # folder holding the files (torchvision formats or class folders)
    num_classes: Optional[int] = None  # None: taken from the data (class folders)
    in_channels: int = MISSING
    image_size: int = MISSING  # side of the square images the model sees, in pixels
    resize: Optional[int] = None  # imagefolder: shorter side resized to this before cropping
    mean: List[float] = field(default_factory=list)  # per-channel, [0,1] scale
    std: List[float] = field(default_factory=list)
    download: bool = False  # torchvision sets: try to download when the files are absent
    class_subset: Optional[List[str]] = None  # imagefolder: keep only these class folders
    images_per_class: Optional[int] = None  # imagefolder: at most this many per class and split
    attack_images: int = 500  # size of the attack set X, drawn from the training split
    eval_images: Optional[int] = None  # size of the evaluation set, drawn from test; None = all
    val_fraction: float = 0.1  # share of the training split held out for validation
    batch_size: int = 128  # training batch size
    num_workers: int = 0
    split_seed: int = 0  # seed of the attack/eval/validation draws
    default_eps: Dict[str, float] = field(default_factory=dict)  # p -> ε (0–255) when none given


@dataclass
class ModelConfig:
    """A victim architecture and how to train it."""

    name: str = MISSING  # cnn | lenet | resnet20 | resnet56 | resnet18 | vgg11 | vgg16 | mobilenet_v2 | torchvision
    arch: Optional[str] = None  # model=torchvision: the torchvision classifier's name
    pretrained: bool = False  # model=torchvision: ImageNet weights from the local hub cache
    checkpoint: Optional[str] = None  # attack these weights instead of training
    width: int = 32  # cnn/lenet: channels of the first convolution
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "onecycle"  # onecycle | cosine | none
    label_smoothing: float = 0.0
    augment: bool = False  # random crop + horizontal flip during training


@dataclass
class TrainerConfig:
    """Lightning Trainer settings used to train the victim."""

    max_epochs: int = 10
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"
    deterministic: bool = True
    enable_progress_bar: bool = True
    log_every_n_steps: int = 20
    limit_train_batches: Optional[float] = None


@dataclass
class AttackConfig:
    """A universal attack. ε is in 0–255 pixel units for every p."""

    method: str = "deepfool_uap"  # deepfool_uap | deepfool_uap_batched | sgd_uap
    eps: Optional[float] = None  # None: the data preset's default for this p
    p: str = "inf"  # inf | 2 | 1
    delta: float = 0.2  # stop when the fooling rate on X reaches 1 - delta
    max_passes: int = 10
    clip: bool = True  # clip x + v to [0,1]
    target_class: Optional[int] = None  # targeted mode: push images to this class
    # DeepFool family
    overshoot: float = 0.02
    num_candidates: int = 10
    max_deepfool_iters: int = 10
    deepfool_norm: Optional[str] = None  # None: same as p; "2" keeps the authors' code's ℓ2 steps
    batch_size: int = 32  # deepfool_uap_batched / sgd_uap: images per update
    aggregate: str = "sum"  # deepfool_uap_batched: how a batch's steps combine (sum | mean)
    # SGD-UAP
    optimizer: str = "sign"  # sign | adam
    step_size: Optional[float] = None  # first step, 0–255 units; None: eps / 10
    lr_schedule: str = "cosine"  # cosine | constant
    beta: float = 9.0  # cross-entropy clip of SGD-UAP
    # evaluation and devices
    eval_batch_size: int = 512
    amp: bool = False  # autocast the victim during evaluation (GPU)
    channels_last: bool = False


@dataclass
class LoggerConfig:
    """TensorBoard logging of the victim training and of the attack."""

    tensorboard: bool = True
    example_images: int = 8  # clean/perturbed pairs in examples.png and TensorBoard
    progress_bar: bool = True


@dataclass
class RunConfig:
    """The whole run: compose -> seed -> data -> victim -> attack -> outputs."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    task_name: str = "uap"
    tags: List[str] = field(default_factory=list)


BENCH_ROWS = ("naive", "art", "deepfool_uap", "deepfool_uap_batched", "sgd_uap")


@dataclass
class BenchSettings:
    """What ``python -m uap_lightning.bench`` runs side by side on one victim and one X."""

    rows: List[str] = field(default_factory=lambda: list(BENCH_ROWS))  # any of BENCH_ROWS, in order
    # per-engine options over the shared ``attack`` settings, e.g. {sgd_uap: {max_passes: 5}}
    engines: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    art_batch_size: int = 128  # ART's prediction batch size (its end-of-pass check runs at 1)
    efficiency_batches: int = 4  # batches of X timed for the batched engine's efficiency


@dataclass
class BenchConfig(RunConfig):
    """The benchmark: the run's data, model, trainer and shared attack settings, plus the rows."""

    bench: BenchSettings = field(default_factory=BenchSettings)
    task_name: str = "bench"


def register_configs() -> None:
    """Register the schemas so ``conf/config.yaml`` and ``conf/bench.yaml`` can name them."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="bench_schema", node=BenchConfig)
