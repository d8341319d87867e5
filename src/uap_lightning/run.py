"""Entry point: compose -> validate -> seed -> data -> victim (cache) -> attack loop -> outputs.

    python -m uap_lightning.run attack.eps=10 attack.p=inf
    python -m uap_lightning.run -m attack.eps=32,64 attack.p=2,inf model=cnn,lenet
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import hydra
import lightning as L
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from uap_lightning.attacks import ThreatModel, build_engine
from uap_lightning.attacks.random_noise import random_perturbation
from uap_lightning.config import register_configs
from uap_lightning.data import build_datamodule
from uap_lightning import metrics as uap_metrics
from uap_lightning.loop import AttackLoop, AttackOutcome, AttackProgressBar, EvaluationSettings
from uap_lightning.report.images import examples_figure
from uap_lightning.report.outputs import write_run_outputs
from uap_lightning.training import Victim, obtain_victim
from uap_lightning.validation import ConfigError, attack_options, validate

log = logging.getLogger("uap_lightning")


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Run one experiment described by ``cfg``; return the metrics written to metrics.json."""
    threat = validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    target = cfg.attack.target_class
    if target is not None and target >= datamodule.num_classes:
        raise ConfigError(f"attack.target_class={target} is not one of the {datamodule.num_classes} classes")
    attack_images, _ = datamodule.attack_set()
    eval_images, eval_labels = datamodule.eval_set()

    victim = obtain_victim(cfg, datamodule, log_dir=str(output_dir))
    if victim.source == "pretrained" and getattr(datamodule, "folder_class_indices", None):
        # an ImageNet head predicts over all class folders: score it against folder positions
        eval_labels = torch.as_tensor(datamodule.folder_class_indices)[eval_labels]
    loggers = (
        [TensorBoardLogger(root_dir=str(output_dir), name="tensorboard", version="attack", default_hp_metric=False)]
        if cfg.logger.tensorboard
        else []
    )
    fabric = Fabric(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        loggers=loggers,
        callbacks=[AttackProgressBar(enabled=cfg.logger.progress_bar)],
    )
    loop = AttackLoop(
        fabric=fabric,
        engine=build_engine(cfg.attack.method, threat, **attack_options(cfg)),
        threat=threat,
        delta=cfg.attack.delta,
        max_passes=cfg.attack.max_passes,
        clip=cfg.attack.clip,
        target_class=target,
        evaluation=EvaluationSettings(cfg.attack.eval_batch_size, cfg.attack.amp, cfg.attack.channels_last),
    )
    outcome = loop.run(victim.module.net, attack_images, eval_images, eval_labels, seed=cfg.seed)
    random_rate = _random_baseline(loop, victim, threat, eval_images, outcome, cfg.seed)

    metrics = _metrics(cfg, threat, victim, outcome, random_rate, len(attack_images), len(eval_images))
    figure = _examples(outcome, eval_images, datamodule.class_names, cfg.logger.example_images)
    for logger in fabric.loggers:
        logger.experiment.add_figure("attack/examples", figure, global_step=metrics["passes"], close=False)
        logger.log_hyperparams(_hparams(cfg, threat), metrics={f"final/{k}": metrics[k] for k in _FINAL_KEYS})
        logger.finalize("success")
    write_run_outputs(output_dir, outcome.result.perturbation, figure, metrics)
    print(_summary(metrics, output_dir))
    return metrics


_FINAL_KEYS = ("fooling_rate", "fooling_rate_attack_set", "perturbed_accuracy", "clean_accuracy", "attack_seconds")


def _random_baseline(
    loop: AttackLoop, victim: Victim, threat: ThreatModel, eval_images, outcome: AttackOutcome, seed: int
) -> float:
    """Fooling rate of a random perturbation of the same ℓp norm (the paper's baseline)."""
    generator = torch.Generator().manual_seed(seed + 1)
    noise = random_perturbation(eval_images.shape[1:], threat.eps, threat.p, generator)
    labels = loop.predict(victim.module.net, eval_images, noise)
    return uap_metrics.fooling_rate(outcome.clean_eval_labels, labels.cpu())


def _metrics(
    cfg: DictConfig,
    threat: ThreatModel,
    victim: Victim,
    outcome: AttackOutcome,
    random_rate: float,
    attack_images: int,
    eval_images: int,
) -> Dict[str, Any]:
    final, result = outcome.final, outcome.result
    history_keys = ("pass", "fooling_rate", "fooling_rate_attack_set", "perturbed_accuracy", "norm_l2",
                    "norm_linf", "updates", "mean_deepfool_iterations", "seconds", "targeted_success_rate")
    metrics: Dict[str, Any] = {
        "fooling_rate": final["fooling_rate"],
        "fooling_rate_attack_set": result.fooling_rate,
        "clean_accuracy": final["clean_accuracy"],
        "perturbed_accuracy": final["perturbed_accuracy"],
        "random_fooling_rate": random_rate,
        "norm_l2": final["norm_l2"],
        "norm_linf": final["norm_linf"],
        "eps": threat.eps,
        "p": threat.p_name,
        "delta": cfg.attack.delta,
        "method": cfg.attack.method,
        "passes": result.passes,
        "converged": result.converged,
        "attack_seconds": final["attack_seconds"],
        "victim_accuracy": victim.test_accuracy if victim.test_accuracy is not None else final["clean_accuracy"],
        "victim_source": victim.source,
        "victim_train_seconds": victim.train_seconds,
        "attack_images": attack_images,
        "eval_images": eval_images,
        "data": cfg.data.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "history": [{k: record[k] for k in history_keys if k in record} for record in outcome.history],
    }
    if cfg.attack.target_class is not None:
        metrics["target_class"] = cfg.attack.target_class
        metrics["targeted_success_rate"] = final["targeted_success_rate"]
    return metrics


def _examples(outcome: AttackOutcome, eval_images, class_names, count: int):
    count = max(1, min(count, len(eval_images)))
    clean = eval_images[:count]
    perturbed = uap_metrics.perturb(clean, outcome.result.perturbation.to(clean.device))
    return examples_figure(
        clean,
        perturbed,
        outcome.clean_eval_labels[:count].tolist(),
        outcome.perturbed_eval_labels[:count].tolist(),
        class_names,
    )


def _hparams(cfg: DictConfig, threat: ThreatModel) -> Dict[str, Any]:
    attack = OmegaConf.to_container(cfg.attack, resolve=True)
    attack.update(eps=threat.eps, p=threat.p_name)
    return {
        "attack": attack,
        "data": cfg.data.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "attack_images": cfg.data.attack_images,
    }


def _summary(m: Dict[str, Any], output_dir: Path) -> str:
    return "\n".join(
        [
            f"victim   {m['model']} on {m['data']} ({m['victim_source']}): accuracy {m['victim_accuracy']:.4f}",
            f"attack   {m['method']} ℓ{m['p']} ε={m['eps']:g}: {m['passes']} passes in {m['attack_seconds']:.1f} s"
            f" ({'reached' if m['converged'] else 'did not reach'} 1−δ={1 - m['delta']:.2f} on X)",
            f"fooling  {m['fooling_rate']:.4f} on {m['eval_images']} eval images "
            f"({m['fooling_rate_attack_set']:.4f} on X, random noise {m['random_fooling_rate']:.4f})",
            f"accuracy {m['clean_accuracy']:.4f} clean -> {m['perturbed_accuracy']:.4f} perturbed",
            f"norm     ℓ2 {m['norm_l2']:.1f}, ℓ∞ {m['norm_linf']:.1f} (0–255 units)",
            f"files    {output_dir.resolve()}",
        ]
    )


register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Hydra entry point; returns the fooling rate so sweepers can optimise it."""
    try:
        return run(cfg)["fooling_rate"]
    except ConfigError as err:
        log.error("%s", err)
        raise


if __name__ == "__main__":
    main()
