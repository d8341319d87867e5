"""Every preset composes and validates; typos and wrong types fail at composition."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF_DIR
from uap_lightning.config_errors import composition_error_message
from uap_lightning.data import dataset_class
from uap_lightning.validation import ConfigError, resolve_threat, validate

ENGINES_WITHOUT_P = {("sv_uap", "1")}  # the generalised power method needs 1 < p


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("data", group_options("data"))
def test_every_data_preset_composes(make_cfg, data):
    cfg = make_cfg(f"data={data}")
    if not dataset_class(cfg.data.name).has_training_split:  # victims come pretrained
        cfg = make_cfg(f"data={data}", "model=efficientnet_lite0")
    assert cfg.data.image_size > 0 and cfg.data.in_channels in (1, 3)
    assert len(cfg.data.mean) == len(cfg.data.std) == cfg.data.in_channels
    # every preset has a default ε for the required norms
    assert {"inf", "2"} <= set(cfg.data.default_eps)
    validate(cfg)


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_preset_composes(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    assert cfg.model.name == model


@pytest.mark.parametrize("attack", group_options("attack"))
@pytest.mark.parametrize("p", ["inf", "2", "1"])
def test_every_attack_preset_validates(make_cfg, attack, p):
    cfg = make_cfg(f"attack={attack}", f"attack.p={p}")
    assert cfg.attack.method == attack
    if (attack, p) in ENGINES_WITHOUT_P:  # refused with a message saying which p it takes
        with pytest.raises(ConfigError, match="attack.p=inf"):
            validate(cfg)
    else:
        validate(cfg)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes(make_cfg, experiment):
    from uap_lightning.models import PretrainedWeightsNotFoundError

    cfg = make_cfg(f"experiment={experiment}")
    try:
        validate(cfg)
    except PretrainedWeightsNotFoundError as err:  # weights that live outside the package: said first
        assert cfg.model.name == "torchvision" and "nothing is downloaded" in str(err)


@pytest.mark.parametrize("group", ["trainer", "logger"])
def test_other_groups_compose(make_cfg, group):
    for option in group_options(group):
        make_cfg(f"{group}={option}")


def test_default_eps_comes_from_the_data_preset(make_cfg):
    assert resolve_threat(make_cfg("data=cifar10", "attack.p=inf")).eps == 8
    assert resolve_threat(make_cfg("data=imagenet", "attack.p=2")).eps == 2000
    assert resolve_threat(make_cfg("data=imagenet", "attack.p=inf")).eps == 10
    assert resolve_threat(make_cfg("data=digits", "attack.p=inf")).eps > 8
    assert resolve_threat(make_cfg("attack.eps=10", "attack.p=inf")).eps == 10


def test_unknown_key_names_the_key(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("data.imgae_size=3")
    assert "Key 'imgae_size' not in 'DataConfig'" in str(err.value.__cause__)


def test_wrong_type_names_the_key(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("attack.max_passes=many")
    assert "max_passes" in str(err.value) + str(err.value.__cause__)


def test_unknown_group_option_lists_the_choices(make_cfg):
    with pytest.raises(MissingConfigException) as err:
        make_cfg("data=imagenette")
    assert "digits" in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("attack.p=3", "attack.p"),
        ("attack.eps=-1", "eps"),
        ("attack.delta=1.5", "attack.delta"),
        ("attack.max_passes=0", "attack.max_passes"),
        ("attack.method=pgd", "pgd"),
        ("attack.target_class=10", "attack.target_class"),
        ("model.checkpoint=/nonexistent/weights.pt", "model.checkpoint"),
    ],
)
def test_bad_settings_fail_before_any_work(make_cfg, override, fragment):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(override))
    assert fragment in str(err.value)


def test_schema_rejects_assignment_of_wrong_type(make_cfg):
    cfg = make_cfg()
    with pytest.raises((ValidationError, ConfigKeyError)):
        cfg.attack.max_passes = "many"


def composition_message(make_cfg, *overrides: str) -> str:
    """What the command line says of ``overrides`` that Hydra cannot compose."""
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(*overrides)
    return composition_error_message(err.value, list(overrides))


def test_eps_as_a_fraction_says_the_units_and_the_value_meant(make_cfg):
    """attack.eps=8/255 reaches the schema as the text '8/255': the message names the units and the ε."""
    assert composition_message(make_cfg, "attack.eps=8/255") == (
        "attack.eps is in 0–255 pixel units: use attack.eps=8 (not 8/255)"
    )
    assert "use attack.eps=3.984 (not 1/64)" in composition_message(make_cfg, "attack.eps=1/64")
    assert "attack.eps must be a number" in composition_message(make_cfg, "attack.eps=ten")


@pytest.mark.parametrize(
    "override, meant",
    [
        ("attack.epss=10", "attack.eps=10"),
        ("atack.eps=10", "attack.eps=10"),
        ("data.imgae_size=3", "data.image_size=3"),
        ("attack=sgd_uap attack.bta=5", "attack.beta=5"),
        ("sed=3", "seed=3"),
    ],
)
def test_a_mistyped_key_gets_a_did_you_mean_and_no_plus_advice(make_cfg, override, meant):
    message = composition_message(make_cfg, *override.split())
    assert f"did you mean {meant}?" in message
    assert "+" not in message and "append" not in message


def test_an_eps_in_image_scale_is_named_with_its_pixel_value(make_cfg, caplog):
    """ε=0.03 for ℓ∞ reads like [0,1] units: the warning gives 0.03 × 255 ≈ 8."""
    import logging

    with caplog.at_level(logging.WARNING):
        resolve_threat(make_cfg("attack.eps=0.03", "attack.p=inf"))
    assert "attack.eps=7.65 (0.03 × 255 ≈ 8)" in caplog.text and "attack.eps_scale=1" in caplog.text


def test_the_default_eps_is_one_lookup_for_any_spelling_of_p(make_cfg):
    """Left out, attack.eps resolves to the data preset's ε for attack.p however p is written, and
    the run's threat model is that same ε (what --cfg job --resolve shows is what runs)."""
    from uap_lightning.validation import resolve_threat

    for spelling in ("2", "2.0"):
        cfg = make_cfg(f"attack.p={spelling}")
        assert cfg.attack.eps == cfg.data.default_eps["2"]
        assert resolve_threat(cfg).eps == cfg.data.default_eps["2"]
    assert make_cfg("attack.p=inf").attack.eps == make_cfg("attack.p=Infinity").attack.eps


@pytest.mark.parametrize(
    "overrides",
    [("model.width=0",), ("model.width=-5",), ("task=transfer", "task.victims=[cnn,{preset:lenet,width:0}]")],
)
def test_a_width_below_one_channel_is_refused_before_any_work(make_cfg, overrides):
    from uap_lightning.tasks import TASKS

    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError, match=r"model.width=-?\d+: the first convolution needs at least 1 channel"):
        attack = validate(cfg)
        TASKS[cfg.task.name].check(cfg, attack)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=resnet-18"], "model=resnet-18 is not an option of model; did you mean model=resnet18? (model: cnn,"),
        (
            ["model.trainer.max_epochs=abc"],
            "unknown setting model.trainer.max_epochs=abc; trainer is a section of its own: trainer.max_epochs=abc",
        ),
        (["trainer.max_epochs=abc"], "trainer.max_epochs: Value 'abc' of type 'str' could not be converted to Integer"),
        (
            ["task=geometry", "task.ks=[1.5]"],
            "task.ks[0]: Value '1.5' of type 'float' could not be converted to Integer",
        ),
    ],
)
def test_settings_hydra_cannot_compose_are_said_in_one_line(tmp_path, overrides, expected):
    from conftest import compose_config

    with pytest.raises(Exception) as err:
        compose_config(overrides, tmp_path)
    message = composition_error_message(err.value, overrides)
    assert message.startswith(expected) and "\n" not in message


def test_missing_torchvision_weights_are_said_before_any_data_is_read(make_cfg, tmp_path, monkeypatch):
    from uap_lightning.models import PretrainedWeightsNotFoundError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = make_cfg("data=imagenet_samples", "model=torchvision", "model.arch=resnet50", "model.pretrained=true")
    with pytest.raises(PretrainedWeightsNotFoundError, match="needs the ImageNet weights of 'resnet50'"):
        validate(cfg)


def test_every_task_declares_the_schema_the_command_line_composes_with():
    from uap_lightning.task_configs import TASK_SCHEMAS
    from uap_lightning.tasks import task_schemas

    assert TASK_SCHEMAS == task_schemas()


def test_a_typo_is_refused_before_lightning_is_imported():
    """The command line composes and checks its settings from schemas free of Lightning, so that it
    refuses a typo in about the time torch takes to load."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['uap_lightning.run', 'attack.esp=1']\n"
        "try:\n"
        "    runpy.run_module('uap_lightning.run', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    print('exit', done.code, sorted(m for m in ('lightning', 'pytorch_lightning') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "did you mean attack.eps=1?" in done.stderr
    assert done.stdout.strip() == "exit 2 []"
