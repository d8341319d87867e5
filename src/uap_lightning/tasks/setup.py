"""The setup every task shares: threat model, data, X, the evaluation set and victims.

``prepare(cfg)`` runs after the settings were checked; victims are obtained on demand,
each from its own model settings, so a task may build several (each trained at most once,
through the cache).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, cast

import lightning as L
import pandas as pd
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.api import check_logits
from uap_lightning.attacks import (
    AttackSettings,
    Ensemble,
    ThreatModel,
    UAPResult,
    checked_target_class,
    folded_copy,
    frozen_eval,
    run_passes,
)
from uap_lightning.attacks.projections import check_resolution
from uap_lightning.config import model_preset
from uap_lightning.data import ImageFolderDataModule, build_datamodule, dataset_class
from uap_lightning.data.base import UAPDataModule
from uap_lightning.errors import ConfigError
from uap_lightning.loggers import instantiate_callbacks, instantiate_loggers, report_to_loggers, run_hparams
from uap_lightning.models.zoo import model_preprocessing
from uap_lightning.progress import PassProgress
from uap_lightning.report.outputs import write_figures, write_metrics
from uap_lightning.training import TrainingLogs, Victim, obtain_victim

log = logging.getLogger(__name__)


def progress_bars(cfg: DictConfig) -> bool:
    """Whether progress bars are drawn: ``extras.progress_bar``, or (null) only on a terminal."""
    setting = cfg.extras.progress_bar
    return sys.stderr.isatty() if setting is None else bool(setting)


@dataclass(frozen=True)
class Task:
    """A task, declared by its module as ``TASK``: its name (``task=NAME``), its settings' schema
    (a :class:`~uap_lightning.config.TaskConfig`), its run, an optional check of its settings
    before any heavy work, and the metric returned to Hydra sweepers ("": none)."""

    name: str
    schema: type
    run: Callable[["Setup"], Dict[str, Any]]
    check: Optional[Callable[[DictConfig, AttackSettings], None]] = None
    objective: str = ""


@dataclass
class Setup:
    """What a task works on. Images are float N×C×H×W in [0,1]; labels int64 (N,)."""

    cfg: DictConfig
    attack: AttackSettings  # the run's attack settings, built once from ``cfg.attack``
    datamodule: UAPDataModule
    attack_images: Tensor  # X
    attack_labels: Tensor
    eval_images: Tensor
    eval_labels: Tensor
    output_dir: Path
    _victims: Dict[str, Victim] = field(default_factory=dict)  # by input size and settings
    _inputs: Dict[int, "Setup"] = field(default_factory=dict)  # the setups at other input sizes

    @property
    def threat(self) -> ThreatModel:
        """The run's threat model (ε in 0–255 units)."""
        return self.attack.threat

    @property
    def seed(self) -> int:
        """The attack seed: X's draw and order, the attack's randomness."""
        return self.attack.seed

    @property
    def class_names(self) -> List[str]:
        return self.datamodule.class_names

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes

    def settings(self) -> Dict[str, Any]:
        """What every task's metrics.json records of the run: threat, engine, data, model, seeds."""
        return {
            "eps": self.threat.eps,
            "p": self.threat.p_name,
            "method": self.attack.method,
            "attack_images": len(self.attack_images),
            "eval_images": len(self.eval_images),
            "eval_source": self.datamodule.eval_source,
            "data": self.cfg.data.name,
            "model": self.cfg.model.name,
            "model_settings": self.victim_settings(),
            "seed": self.cfg.seed,
            "attack_seed": self.seed,
            "threads": torch.get_num_threads(),
        }

    def victim_settings(self) -> Dict[str, Any]:
        """The run's model settings that are set (``model.adversarial`` and its radius and step
        included), and the training settings unless the victim is pretrained, each under the path a
        command line sets it by (``model.width``, ``trainer.max_epochs``)."""
        model = cast(Dict[str, Any], OmegaConf.to_container(self.cfg.model, resolve=True))  # a mapping: a dict
        settings = {f"model.{key}": value for key, value in model.items() if value is not None and value != []}
        if not model.get("pretrained"):
            trainer = cast(Dict[str, Any], OmegaConf.to_container(self.cfg.trainer, resolve=True))
            settings.update({f"trainer.{key}": value for key, value in trainer.items()})
        return settings

    def finish(
        self,
        results: Dict[str, Any],
        title: str,
        table: pd.DataFrame,
        figures: Optional[Mapping[str, Figure]] = None,
        scalars: Optional[Mapping[str, float]] = None,
        steps: Optional[Mapping[int, Mapping[str, float]]] = None,
        **markdown: Any,
    ) -> Dict[str, Any]:
        """Write ``figures`` (``<name>.png`` and ``.pdf``), then ``results`` with the run's settings (a
        key in ``results`` wins) as metrics.json (last); report to the run's loggers (a run named
        after the task): the run's hparams, the numbers of ``results`` (``<task>/<key>``) and
        ``scalars`` (tag → value), and ``steps`` (step → {tag: value}, e.g. by the size of X);
        TensorBoard also gets the figures and the table; log ``table`` under ``title`` and the run
        folder; return what was written."""
        task = self.cfg.task.name
        final = {
            f"{task}/{k}": float(v)
            for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        final.update(scalars or {})
        results = {**self.settings(), **results}
        write_figures(self.output_dir, figures or {})
        text = table.to_markdown(**{"floatfmt": ".3f", **markdown})
        report_to_loggers(  # a run named after the task in every logger of the run
            instantiate_loggers(self.cfg.logger, task),
            run_hparams(self.cfg, self.attack),
            final,
            prefix=task,
            figures=figures,
            steps=steps,
            text=f"{title}\n\n{text}",
        )
        write_metrics(self.output_dir, results)
        log.info("%s\n%s", title, text)
        log.info("files    %s", self.output_dir.resolve())
        return results

    def predict(self, net: nn.Module, images: Tensor, perturbation: Optional[Tensor] = None) -> Tensor:
        """Labels (N,) of ``net`` (in eval mode) on ``images`` (+ ``perturbation``, C×H×W), in batches
        of the attack's ``eval_batch_size``, x + v clipped, in the precision and memory format the
        attack predicts in."""
        with frozen_eval(net):
            return metrics.predict(
                net,
                images,
                perturbation,
                batch_size=self.attack.eval_batch_size,
                clip=self.attack.clip,
                precision=self.attack.precision,
                channels_last=bool(self.cfg.attack.channels_last),
            )

    def attack_set(self, count: int) -> Tuple[Tensor, Tensor]:
        """An attack set of ``count`` images drawn with the attack seed (a prefix-stable draw)."""
        return self.datamodule.attack_set(count, seed=self.seed)

    def victim(self, model_cfg: Optional[Any] = None, *, log_training: bool = True) -> Victim:
        """The victim of ``model_cfg`` (default: the run's ``model``) built for this setup's images
        (an architecture may depend on its input size, as EfficientNet's "same" padding does),
        trained with the run's ``trainer`` settings and seed, through the cache; the same object
        for equal settings and size. A victim fed images of another size comes from the setup of
        that size (:meth:`input_for`)."""
        model_cfg = self.cfg.model if model_cfg is None else model_cfg
        key = repr((self.image_size, sorted(dict(model_cfg).items())))
        if key not in self._victims:
            logs = TrainingLogs(
                loggers=instantiate_loggers(self.cfg.logger, "victim") if log_training else [],
                callbacks=instantiate_callbacks(self.cfg.callbacks)["training"],
                progress_bar=progress_bars(self.cfg),
                log_dir=str(self.output_dir) if log_training else None,
            )
            victim = obtain_victim(
                model_cfg,
                self.cfg.trainer,
                self.datamodule,
                seed=self.cfg.seed,
                cache_dir=self.cfg.paths.cache_dir,
                lock_timeout=self.cfg.paths.lock_timeout,
                logs=logs,
                callbacks_cfg=self.cfg.callbacks,
            )
            victim.module.net.eval()
            if self.cfg.attack.channels_last:  # every task attacks and scores it in one memory format
                victim.module.net.to(memory_format=torch.channels_last)
            check_logits(victim.net, self.attack_images[:2])  # finite N×K logits, before any attack
            self._victims[key] = victim
        return self._victims[key]

    def attacked(self) -> Tuple[nn.Module, List[Victim]]:
        """The net the attack runs on and the victims in it: the run's victim with batch norm folded,
        or with ``attack.ensemble`` an :class:`Ensemble` of each listed victim (folded), each fed the
        images at the input size its pretrained weights declare on image-file data (else the data's)."""
        entries = list(self.cfg.attack.get("ensemble") or [])
        if not entries:
            victim = self.victim()
            return folded_copy(victim.net), [victim]
        configs = [model_preset(entry) for entry in entries]
        inputs = [self.input_for(config) for config in configs]
        victims = [own.victim(config, log_training=False) for own, config in zip(inputs, configs)]
        sizes = [None if own is self else own.image_size for own in inputs]
        names = ensemble_labels(configs)
        for name, size in zip(names, sizes):
            log.info("ensemble member %s sees the images at %s px", name, size or self.image_size)
        return Ensemble([folded_copy(v.net) for v in victims], sizes, names), victims

    def at_input(self, image_size: int, resize: Optional[int]) -> "Setup":
        """This setup with its images decoded again at ``image_size`` pixels (after resizing the
        shorter side to ``resize``; None: the preset's resizing), for a victim that expects that
        input: the same photographs in X and the eval set, the same victims. Image-file data only."""
        cfg = self.cfg.copy()
        cfg.data.image_size = int(image_size)
        if resize is not None:
            cfg.data.resize = int(resize)
        moved = prepare(cfg, self.attack)
        if not (
            torch.equal(moved.attack_labels, self.attack_labels) and torch.equal(moved.eval_labels, self.eval_labels)
        ):
            raise RuntimeError(f"decoding {cfg.data.name} at {image_size} px drew other images; this is a bug")
        moved._victims, moved._inputs = self._victims, self._inputs
        return moved

    def input_for(self, model_cfg: Any) -> "Setup":
        """The setup whose images a victim of ``model_cfg`` is fed: on image-file data, the run's
        photographs decoded at the input size its pretrained weights declare (one setup per size,
        kept: :meth:`at_input`); otherwise, or at this setup's size, this setup."""
        files = issubclass(dataset_class(self.cfg.data.name), ImageFolderDataModule)
        declared = model_preprocessing(model_cfg) if files else None
        if declared is None or declared.image_size == self.image_size:
            return self
        size = declared.image_size
        if size not in self._inputs:
            resize = declared.resize_for(size) if self.cfg.data.get("resize") is not None else None
            log.info("decoding the photographs at %d px (resize %s) for model=%s", size, resize, model_cfg.name)
            self._inputs[size] = self.at_input(size, resize)
        return self._inputs[size]

    @property
    def image_size(self) -> int:
        """The side of the images, pixels."""
        return int(self.eval_images.shape[-1])

    def labels_for(self, victim: Victim, labels: Tensor) -> Tensor:
        """``labels`` (the data's classes, int64) in ``victim``'s output indices: an ImageNet head
        predicts over all class folders, so its labels are the folders' positions."""
        folders = getattr(self.datamodule, "folder_class_indices", None)
        if victim.source == "pretrained" and folders:
            return torch.as_tensor(folders)[labels]
        return labels

    def eval_labels_for(self, victim: Victim) -> Tensor:
        """The eval labels in ``victim``'s output indices (see :meth:`labels_for`)."""
        return self.labels_for(victim, self.eval_labels)


def universal_perturbation(
    setup: "Setup", net: nn.Module, attack_images: Optional[Tensor] = None, seed: Optional[int] = None
) -> UAPResult:
    """A universal perturbation of ``net`` with the run's attack settings, as the attack task
    computes it (same engine, order, seed and kept pass, so the same v), on ``attack_images``
    (default: the run's X) with ``seed`` (default: the attack seed). No files; a log line per pass
    unless ``attack.progress=false``."""
    settings = setup.attack if seed is None else setup.attack.replace(seed=int(seed))
    images = setup.attack_images if attack_images is None else attack_images
    display = PassProgress(
        f"{settings.method} passes",
        settings.max_passes,
        lines=bool(setup.cfg.attack.progress),
        logger=log,
        rate_name=settings.rate_on_x_name,
    )
    with display:
        return run_passes(net, settings, images, setup.predict(net, images), on_pass_end=display.on_pass_end)


def eval_fooling_rate(setup: "Setup", net: nn.Module, perturbation: Tensor, clean: Optional[Tensor] = None) -> float:
    """Fooling rate of ``perturbation`` on the run's eval set for ``net`` (the paper's definition),
    against ``clean``: ``net``'s (N,) predictions on the eval set without perturbation (computed
    when not given)."""
    if clean is None:
        clean = setup.predict(net, setup.eval_images)
    return metrics.fooling_rate(clean, setup.predict(net, setup.eval_images, perturbation))


def victim_label_names(names: List[str], victim: Victim) -> List[str]:
    """A name for every output of ``victim``: the class names, then indices (an ImageNet head
    predicts beyond the data's classes)."""
    hparams: Any = victim.module.hparams  # the classifier's __init__ arguments, by name
    outputs = int(hparams.num_classes)
    return [str(n) for n in names[:outputs]] + [str(i) for i in range(len(names), outputs)]


def ensemble_labels(configs: List[Any]) -> List[str]:
    """A label per model config: its preset name, numbered when repeated (lenet, lenet-2)."""
    seen: Dict[str, int] = {}
    labels = []
    for config in configs:
        seen[config.name] = seen.get(config.name, 0) + 1
        labels.append(config.name if seen[config.name] == 1 else f"{config.name}-{seen[config.name]}")
    return labels


def prepare(cfg: DictConfig, attack: AttackSettings) -> Setup:
    """Seed, load the data and draw X and the eval set (no victim yet); ``cfg`` was checked and
    ``attack`` built from it."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    try:
        checked_target_class(attack.target_class, datamodule.num_classes)
        attack.threat.check_fits(datamodule.image_shape)
        check_resolution(attack.resolution, datamodule.image_shape)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    attack_images, attack_labels = datamodule.attack_set(seed=attack.seed)
    eval_images, eval_labels = datamodule.eval_set(attack_seed=attack.seed)
    return Setup(
        cfg=cfg,
        attack=attack,
        datamodule=datamodule,
        attack_images=attack_images,
        attack_labels=attack_labels,
        eval_images=eval_images,
        eval_labels=eval_labels,
        output_dir=Path(cfg.paths.output_dir),
    )
