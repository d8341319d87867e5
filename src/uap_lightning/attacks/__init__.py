"""Universal adversarial perturbation engines, pure torch (no Lightning, no Hydra)."""

# ENGINES lists the engines in the order of these imports (each registers itself on import): unsorted
# isort: off
from uap_lightning.attacks.base import PassStats, UniversalAttack, checked_target_class, ensemble_engines
from uap_lightning.attacks.deepfool import DeepFoolResult, deepfool_batched, deepfool_single
from uap_lightning.attacks.algorithm_one import AlgorithmOne
from uap_lightning.attacks.engines.deepfool_uap import DeepFoolUAP
from uap_lightning.attacks.engines.deepfool_uap_batched import BatchedDeepFoolUAP
from uap_lightning.attacks.ensemble import Ensemble
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer, SingleProcess, TorchDistributed
from uap_lightning.attacks.driver import (
    KeptPerturbation,
    PassReport,
    UAPResult,
    attack_set_rate,
    run_passes,
)
from uap_lightning.attacks.engines import ENGINES, build_engine, engine_class, import_engine_modules, register_engine
from uap_lightning.attacks.inner import (
    INNER_ATTACKS,
    InnerAttack,
    InnerOptions,
    InnerResult,
    inner_class,
    register_inner,
)
from uap_lightning.attacks.model_state import CompiledPredictions, folded_copy, frozen_eval, model_device
from uap_lightning.attacks.projections import dual_norm, dual_step, lp_norm, project_lp
from uap_lightning.attacks.settings import KEEP_CHOICES, AttackSettings
from uap_lightning.attacks.engines.sgd_uap import SGDUAP
from uap_lightning.attacks.engines.gd_uap import GDUAP  # after SGD-UAP: ENGINES keeps the engines in import order
from uap_lightning.attacks.engines.sga import SGA
from uap_lightning.attacks.engines.trm_uap import TRMUAP
from uap_lightning.attacks.engines.gap import GAP
from uap_lightning.attacks.engines.sv_uap import SVUAP
from uap_lightning.attacks.threat import ThreatModel, parse_p
# isort: on

import_engine_modules()  # an engine module added to this package registers itself

__all__ = [
    "AlgorithmOne",
    "AttackSettings",
    "BatchedDeepFoolUAP",
    "CompiledPredictions",
    "KEEP_CHOICES",
    "KeptPerturbation",
    "PassReport",
    "DeepFoolResult",
    "DeepFoolUAP",
    "ENGINES",
    "Ensemble",
    "GAP",
    "GDUAP",
    "INNER_ATTACKS",
    "InnerAttack",
    "InnerOptions",
    "InnerResult",
    "PassStats",
    "Reducer",
    "SINGLE_PROCESS",
    "SGA",
    "SGDUAP",
    "SVUAP",
    "TRMUAP",
    "SingleProcess",
    "ThreatModel",
    "TorchDistributed",
    "UAPResult",
    "UniversalAttack",
    "attack_set_rate",
    "build_engine",
    "checked_target_class",
    "deepfool_batched",
    "deepfool_single",
    "dual_norm",
    "dual_step",
    "engine_class",
    "ensemble_engines",
    "folded_copy",
    "frozen_eval",
    "inner_class",
    "lp_norm",
    "model_device",
    "parse_p",
    "project_lp",
    "register_engine",
    "register_inner",
    "run_passes",
]
