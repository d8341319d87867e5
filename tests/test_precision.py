"""attack.precision: the victim under autocast, the perturbation in float32."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from attack_helpers import digits_victim, one_thread  # noqa: F401  (one_thread is a fixture)
from uap_lightning import compute_uap
from uap_lightning.attacks import AttackSettings, ThreatModel


class DtypeRecorder(nn.Module):
    """``model`` that records the dtype of its logits in passes that build a graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dtypes: set = set()

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        if torch.is_grad_enabled():
            self.dtypes.add(logits.dtype)
        return logits


@pytest.mark.parametrize("precision, dtype", [("32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_victim_runs_at_the_precision_and_v_stays_float32(one_thread, precision, dtype):
    model, attack, _ = digits_victim()
    recorder = DtypeRecorder(model)
    result = compute_uap(
        recorder, attack[:64], eps=48, method="sgd_uap", max_passes=1, precision=precision, baselines=False
    )
    assert recorder.dtypes == {dtype}
    assert result.perturbation.dtype == torch.float32
    assert float(result.perturbation.abs().max()) <= 48 / 255 + 1e-7


def test_bf16_finds_nearly_the_float32_perturbation(one_thread):
    model, attack, _ = digits_victim()
    full, low = (
        compute_uap(model, attack, eps=48, method="sgd_uap", max_passes=2, precision=p, baselines=False)
        for p in ("32", "bf16")
    )
    agree = float((full.perturbation.sign() == low.perturbation.sign()).float().mean())
    assert agree > 0.8 and abs(full.fooling_rate - low.fooling_rate) < 0.1


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of 32, bf16, 16"):
        AttackSettings(ThreatModel.parse(10, "inf"), method="sgd_uap", precision="fp8")


def test_channels_last_is_a_setting_of_the_result_and_of_every_task(make_cfg):
    """The memory format changes the convolutions' rounding, so it changes a sign-step attack's
    path: a state saved in one format is not resumed in the other, and every task's victims are
    attacked and scored in the run's format, as the attack task's are."""
    from uap_lightning.tasks import prepare
    from uap_lightning.tasks.attack import settings_fingerprint
    from uap_lightning.validation import validate

    plain, stored = make_cfg("attack.channels_last=false"), make_cfg("attack.channels_last=true")
    assert settings_fingerprint(plain, "data") != settings_fingerprint(stored, "data")
    setup = prepare(stored, validate(stored))
    convolutions = [m for m in setup.victim().net.modules() if isinstance(m, torch.nn.Conv2d)]
    convolution = next(m for m in convolutions if m.in_channels > 1)
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    assert not convolution.weight.is_contiguous()  # 4-D weights with more than one channel: not both
