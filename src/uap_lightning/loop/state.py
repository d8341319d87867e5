"""The attack state file (``attack_state.pt``): everything needed to continue an attack after a
pass, checksummed, saved so that a failed save never replaces the last good state.

The file holds ``{"version", "sha256", "payload"}``: the state's dict serialised by
``torch.save`` (a uint8 tensor) beside the sha256 of those bytes; both loads are tensors-only.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from lightning.fabric import Fabric
from torch import Tensor

from uap_lightning.atomic import atomic_write
from uap_lightning.attacks import KeptPerturbation, UAPResult
from uap_lightning.errors import DamagedFileError

STATE_VERSION = 2  # 2: the state travels as a torch.save payload beside its sha256


@dataclass
class AttackState:
    """Everything needed to continue an attack after its pass ``passes``: v after that pass,
    the kept perturbation, the generator state, the per-pass history and attack seconds."""

    fingerprint: str  # of the settings that determine the result
    passes: int
    perturbation: Tensor  # C×H×W, [0,1] scale
    kept: KeptPerturbation
    generator_state: Tensor
    history: List[Dict[str, Any]]
    attack_seconds: float
    finished: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "passes": self.passes,
            "perturbation": self.perturbation,
            "kept_perturbation": self.kept.perturbation,
            "kept_fooling_rate": self.kept.fooling_rate,
            "kept_pass": self.kept.pass_index,
            "generator_state": self.generator_state,
            "history": self.history,
            "attack_seconds": self.attack_seconds,
            "finished": self.finished,
        }

    def to_file_content(self) -> Dict[str, Any]:
        """What the state file holds: ``to_dict()`` serialised by ``torch.save`` (a uint8 tensor)
        beside the sha256 of those bytes, which :meth:`load` checks."""
        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        payload = buffer.getvalue()
        return {
            "version": STATE_VERSION,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        }

    @classmethod
    def load(cls, path: Path) -> Optional["AttackState"]:
        """The state saved at ``path`` (tensors-only load), or None when there is none.

        DamagedFileError when the file exists but cannot be read as an attack state, or when its
        contents do not match their sha256 checksum."""
        if not path.is_file():
            return None
        try:
            # torch.load, not Fabric's: a Fabric of several devices loads only once launched
            content = torch.load(path, map_location="cpu", weights_only=True)
            if content.get("version") != STATE_VERSION:
                raise ValueError(f"attack state version {content.get('version')!r}, expected {STATE_VERSION}")
            payload, checksum = content["payload"].numpy().tobytes(), content["sha256"]
        except Exception as err:  # any failure to read the state means it cannot be resumed
            raise DamagedFileError(f"attack state {path} cannot be read: {err}") from None
        if hashlib.sha256(payload).hexdigest() != checksum:
            raise DamagedFileError(
                f"attack state {path} is damaged: its contents do not match their sha256 checksum, so the attack "
                "cannot continue from it"
            )
        try:
            return cls.from_dict(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
        except Exception as err:
            raise DamagedFileError(f"attack state {path} cannot be read: {err}") from None

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "AttackState":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"attack state version {state.get('version')!r}, expected {STATE_VERSION}")
        return cls(
            fingerprint=str(state["fingerprint"]),
            passes=int(state["passes"]),
            perturbation=state["perturbation"],
            kept=KeptPerturbation(
                state["kept_perturbation"], float(state["kept_fooling_rate"]), int(state["kept_pass"])
            ),
            generator_state=state["generator_state"],
            history=list(state["history"]),
            attack_seconds=float(state["attack_seconds"]),
            finished=bool(state["finished"]),
        )

    def result(self, rate_on_x_key: str, delta: float) -> UAPResult:
        """The attack's result as of this state's pass: the kept perturbation, converged when the
        last pass's rate on X (``rate_on_x_key``) reached 1 − ``delta``."""
        rate = self.history[-1][rate_on_x_key] if self.history else self.kept.fooling_rate
        return UAPResult(
            self.kept.perturbation,
            self.kept.fooling_rate,
            passes=self.passes,
            converged=rate >= 1.0 - delta,
            best_pass=self.kept.pass_index,
            last_perturbation=self.perturbation,
        )


def no_pass_result(shape: Sequence[int], dtype: torch.dtype) -> UAPResult:
    """The result of an attack stopped before its first pass: v = 0 of C×H×W ``shape``."""
    zero = torch.zeros(tuple(shape), dtype=dtype)
    return UAPResult(zero, 0.0, passes=0, best_pass=0, last_perturbation=zero)


def save_state(fabric: Fabric, path: Path, state: AttackState) -> None:
    """Save ``state`` (with its checksum) at ``path`` from rank 0, atomically (a failed save
    leaves the last state in place), the other ranks waiting until it is written."""
    if fabric.is_global_zero:
        content = state.to_file_content()
        atomic_write(path, lambda f: torch.save(content, f))
    fabric.barrier()
