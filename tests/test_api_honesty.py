"""The Python API says when a result means nothing, and speaks its own keywords' names."""

from __future__ import annotations

import warnings

import pytest
import torch

from attack_helpers import digits_victim, one_thread, tiny_cnn  # noqa: F401  (one_thread is a fixture)
from uap_lightning import compute_uap, fooling_rate


def test_the_result_carries_the_random_baselines_measured_on_the_images(one_thread):
    model, attack, _ = digits_victim()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a strong result warns about nothing
        result = compute_uap(model, attack, eps=64, method="sgd_uap")
    assert result.fooling_rate_attack_set == pytest.approx(fooling_rate(model, attack, result.perturbation))
    assert 0 < result.random_fooling_rate < 0.3 and 0 <= result.random_same_l2_fooling_rate < 0.3
    assert result.beats_random is True
    assert result.fooling_rate_attack_set > max(result.random_fooling_rate, result.random_same_l2_fooling_rate) + 0.05


def test_a_result_that_does_not_beat_noise_warns_with_what_to_try(one_thread):
    model, attack, _ = digits_victim()
    with pytest.warns(UserWarning, match=r"does not beat random noise.*try: .*method=\"sgd_uap\"") as record:
        result = compute_uap(model, attack, eps=64, method="gd_uap", max_passes=2)
    assert result.beats_random is False
    assert "attack." not in str(record[0].message)


def test_a_victim_that_predicts_one_class_warns(one_thread):
    _, attack, _ = digits_victim()
    dead = tiny_cnn()
    for param in dead.parameters():
        param.data.zero_()
    with pytest.warns(UserWarning, match="predicts class 0 of 10 for all 150 images"):
        compute_uap(dead, attack, eps=64, method="sgd_uap", max_passes=1)


def test_baselines_can_be_skipped(one_thread):
    model, attack, _ = digits_victim()
    result = compute_uap(model, attack[:20], eps=64, method="sgd_uap", max_passes=1, baselines=False)
    assert result.beats_random is None and result.random_fooling_rate is None


@pytest.mark.parametrize(
    "keywords, expected",
    [
        ({"method": "sgd-uap"}, r"^method must be one of .*got 'sgd-uap' \(did you mean 'sgd_uap'\?\)"),
        (
            {"method": "sgd_uap", "stepsize": 1},
            r"^method=sgd_uap does not take the keyword\(s\) stepsize \(did you mean 'step_size'\?\)",
        ),
        ({"method": "sgd_uap", "step_size": -1}, r"^step_size must be a positive number"),
        ({"delta": 2}, r"^delta must lie in \(0, 1\)"),
        ({"method": "sgd_uap", "input_diversity": 2}, r"^input_diversity must lie in \[0, 1\]"),
    ],
)
def test_errors_name_the_keyword(keywords, expected):
    with pytest.raises((ValueError, TypeError), match=expected) as err:
        compute_uap(tiny_cnn(), torch.rand(4, 1, 8, 8), eps=64, **keywords)
    assert "attack." not in str(err.value)
