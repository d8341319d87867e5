"""The attack loop on Lightning Fabric and its parts, one job per module:

- :mod:`~uap_lightning.loop.attack_loop`: the loop that composes them (:class:`AttackLoop`);
- :mod:`~uap_lightning.loop.records`: each pass's v scored on the eval set, the outcome;
- :mod:`~uap_lightning.loop.state`: the checksummed state file an attack resumes from;
- :mod:`~uap_lightning.loop.pass_log`: a pass in the run's loggers;
- :mod:`~uap_lightning.loop.spawn`: the attack in the processes of several devices;
- :mod:`~uap_lightning.loop.progress_bar`: the progress display as a Fabric callback;
- :mod:`~uap_lightning.loop.generator`: a generator's training (``attack=gap``) in its place.
"""

from uap_lightning.loop.attack_loop import AttackLoop, EvaluationSettings
from uap_lightning.loop.generator import train_generator
from uap_lightning.loop.progress_bar import AttackProgressBar
from uap_lightning.loop.records import AttackOutcome, PassRecords
from uap_lightning.loop.state import AttackState

__all__ = [
    "AttackLoop",
    "AttackOutcome",
    "AttackProgressBar",
    "AttackState",
    "EvaluationSettings",
    "PassRecords",
    "train_generator",
]
