"""ThreatModel parsing and its error messages."""

import math

import pytest

from uap_lightning.attacks import ThreatModel, parse_p


@pytest.mark.parametrize(
    "value, expected",
    [
        ("inf", math.inf),
        ("Infinity", math.inf),
        (float("inf"), math.inf),
        (2, 2.0),
        ("2", 2.0),
        ("2.0", 2.0),
        (1, 1.0),
        ("1", 1.0),
    ],
)
def test_parse_p_accepts_common_spellings(value, expected):
    assert parse_p(value) == expected


@pytest.mark.parametrize("value", [3, "3", "l2", 0, -1, True, None, float("nan")])
def test_parse_p_rejects_other_norms_with_a_fix(value):
    with pytest.raises(ValueError, match="attack.p must be one of 1, 2, inf"):
        parse_p(value)


def test_parse_message_names_the_bad_value():
    with pytest.raises(ValueError, match="got 3"):
        ThreatModel.parse(10, 3)


@pytest.mark.parametrize("eps", [0, -1, float("nan"), float("inf"), "ten", True])
def test_parse_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="attack.eps must be a positive finite number"):
        ThreatModel.parse(eps, "inf")


def test_radius_and_name():
    threat = ThreatModel.parse("10", "Infinity")
    assert threat == ThreatModel(10.0, math.inf)
    assert threat.radius == pytest.approx(10 / 255)
    assert threat.p_name == "inf"
    assert ThreatModel.parse(2000, "2").p_name == "2"
    assert ThreatModel.parse(5, 1).p_name == "1"


def test_threat_model_is_frozen():
    threat = ThreatModel.parse(10, 2)
    with pytest.raises(AttributeError):
        threat.eps = 3.0
