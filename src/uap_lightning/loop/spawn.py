"""An attack in the processes a Fabric of several devices spawns (strategy ``ddp_spawn``), its
outcome handed back to the main process through a file.

Fabric's launcher would send a return value through a pipe it reads only after the workers exit,
which a large value blocks; so rank 0 writes the outcome and each pass's (record, v) to a file
(tensors-only) that the main process reads once the workers are done, and logs from there, so
that every log file has one writer.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from lightning.fabric import Fabric
from torch import Tensor

from uap_lightning.attacks import UAPResult
from uap_lightning.loop.records import AttackOutcome

PassEntries = List[Tuple[Dict[str, Any], Tensor]]  # each pass's (record, v), in order
# the attack on one rank: (fabric, *arguments, log_pass=...) → its outcome; picklable (a
# module-level function, or a functools.partial of one), as the processes are spawned
RankAttack = Callable[..., AttackOutcome]


def launch(fabric: Fabric, attack: RankAttack, *arguments: Any) -> Tuple[AttackOutcome, PassEntries]:
    """Run ``attack(fabric, *arguments, log_pass=...)`` in the processes of ``fabric``; return
    rank 0's outcome and each pass's (record, v) as ``log_pass`` received them."""
    with tempfile.TemporaryDirectory(prefix="uap-attack-") as folder:
        sent = Path(folder) / "outcome.pt"
        fabric.launch(functools.partial(_on_rank, attack=attack, sent=sent), *arguments)
        return _received(sent)


def _on_rank(fabric: Fabric, *arguments: Any, attack: RankAttack, sent: Path) -> None:
    """``attack`` in one spawned process; rank 0 saves the outcome and the passes to ``sent``."""
    passes: PassEntries = []

    def log_pass(record: Dict[str, Any], v: Tensor) -> None:
        passes.append((dict(record), v.detach().cpu().clone()))

    outcome = attack(fabric, *arguments, log_pass=log_pass)
    if fabric.is_global_zero:
        torch.save({"outcome": dataclasses.asdict(outcome), "passes": passes}, sent)


def _received(sent: Path) -> Tuple[AttackOutcome, PassEntries]:
    """What rank 0 saved at ``sent`` (read tensors-only): the outcome and each pass's (record, v)."""
    saved = torch.load(sent, map_location="cpu", weights_only=True)
    fields = saved["outcome"]
    outcome = AttackOutcome(**{**fields, "result": UAPResult(**fields["result"])})
    return outcome, [(record, perturbation) for record, perturbation in saved["passes"]]
