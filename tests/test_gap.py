"""GAP, the generative engine: its scaling into the ε-ball, seeding, loss, weights files, the API and
the CLI path, where a Lightning Trainer trains the generator and resumes from its checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attack_helpers import digits_victim, one_thread  # noqa: F401
from uap_lightning import compute_uap, fooling_rate
from uap_lightning.attacks import AttackSettings, ThreatModel, folded_copy, run_passes
from uap_lightning.attacks.engines.gap import GAP, default_blocks, default_ngf, generator_state, reflect_pad
from uap_lightning.errors import ConfigError, DamagedFileError
from uap_lightning.tasks import prepare, run_task
from uap_lightning.tasks.setup import universal_perturbation
from uap_lightning.validation import validate

pytestmark = pytest.mark.usefixtures("one_thread")

# A digits run of the attack task: a 2-epoch cnn, 60 attack images, never converging.
CLI = (
    "attack=gap",
    "trainer.max_epochs=2",
    "data.attack_images=60",
    "attack.eps=64",
    "attack.delta=0.01",
    "logger=tensorboard",
)


def engine(eps: float = 64, p: str = "inf", shape=(1, 8, 8), **options) -> GAP:
    """A GAP engine with its generator built for ``shape``."""
    gap = GAP(ThreatModel.parse(eps, p), **options)
    gap.build(shape)
    return gap


def test_reflection_padding_matches_torch():
    x = torch.randn(2, 3, 9, 7)
    assert torch.equal(reflect_pad(x, 3), F.pad(x, (3, 3, 3, 3), mode="reflect"))


def test_the_generator_scales_with_the_image():
    """The paper's ngf=64 and 6 blocks from 224 px up, fewer for smaller images, unless set; the
    output has the image's shape whatever the side (odd sides are cropped)."""
    assert (default_ngf(224), default_blocks(224)) == (64, 6) == (default_ngf(299), default_blocks(299))
    assert (default_ngf(32), default_blocks(32)) == (8, 1)
    small = engine().generator
    assert (small.ngf, small.blocks) == (8, 1)
    chosen = engine(ngf=16, blocks=2, shape=(3, 13, 11))
    assert (chosen.generator.ngf, chosen.generator.blocks) == (16, 2)
    assert chosen.perturbation().shape == (3, 13, 11)
    with pytest.raises(ValueError, match="at least 5×5 pixels"):
        engine(shape=(1, 4, 8))


@pytest.mark.parametrize("p, eps", [("inf", 10.0), ("2", 300.0), ("1", 3000.0)])
def test_the_perturbation_uses_the_whole_budget(p, eps):
    """δ = G(z)·ε/‖G(z)‖_p lies on the ℓp sphere of radius ε/255, before and after training."""
    model, images, _ = digits_victim()
    gap = engine(eps, p)
    radius = ThreatModel.parse(eps, p).radius
    v = gap.perturbation()
    for _ in range(2):
        assert v.shape == (1, 8, 8)
        assert float(torch.linalg.vector_norm(v.flatten(), ord=float(p))) == pytest.approx(radius, rel=1e-5)
        v, stats = gap.run_pass(model, v, images, model(images).argmax(1), torch.Generator().manual_seed(0))
        assert stats.updates == math.ceil(len(images) / 30)
    if p == "inf":  # the paper's ℓ∞ scaling: some entry at ±ε, none beyond
        assert float(v.abs().max()) == pytest.approx(radius, rel=1e-6)


def test_the_seed_draws_the_noise_and_the_weights_carry_it(tmp_path):
    """The same seed gives the same δ, another seed another noise and another δ; the weights
    file (noise included) gives its δ whatever the seed."""
    first, again, other = engine(seed=0), engine(seed=0), engine(seed=1)
    assert torch.equal(first.perturbation(), again.perturbation())
    assert not torch.equal(first.generator.noise, other.generator.noise)
    assert not torch.allclose(first.perturbation(), other.perturbation())
    torch.save(generator_state(first.generator), tmp_path / "generator.pt")
    loaded = engine(seed=1, generator_weights=str(tmp_path / "generator.pt"))
    assert torch.equal(loaded.perturbation(), first.perturbation())


def test_training_lowers_the_loss_and_fools_more_than_the_untrained_generator():
    """Three passes lower log H(f(x+δ), 1_{y_ll}) on X and raise the fooling rate; targeted, they
    raise the share of images sent to the target. A loss of the wrong sign fails both."""
    model, images, _ = digits_victim()
    clean = model(images).argmax(1)
    for target in (None, 3):
        gap = engine(target_class=target)
        aims = gap.aims(model, images)
        if target is None:
            assert torch.equal(aims, model(images).argmin(1))
        with torch.no_grad():
            loss_before = float(gap.fooling_loss(model, images, aims))
        v_before, v = gap.perturbation(), None
        generator = torch.Generator().manual_seed(0)
        for index in range(3):
            v, _ = gap.run_pass(model, torch.zeros(1, 8, 8), images, clean, generator, pass_index=index)
        with torch.no_grad():
            assert float(gap.fooling_loss(model, images, aims)) < loss_before - 0.05
        if target is None:
            assert fooling_rate(model, images, v) > fooling_rate(model, images, v_before) + 0.02
        else:
            after, before = (
                float((model((images + u).clamp(0, 1)).argmax(1) == target).float().mean()) for u in (v, v_before)
            )
            assert after > before + 0.05


def test_weights_files_load_tensors_only_and_refuse_another_shape(tmp_path):
    """generator.pt loads back into the same δ; another image size or ngf, or a file that is no
    state dict of tensors, is refused naming attack.generator_weights; a missing file too."""
    path = tmp_path / "generator.pt"
    torch.save(generator_state(engine(shape=(1, 8, 8)).generator), path)
    for options in ({"shape": (3, 8, 8)}, {"ngf": 16}):
        with pytest.raises(ConfigError, match=r"attack.generator_weights=.*does not fit the generator.*has shape"):
            engine(generator_weights=str(path), **options)
    torch.save({"generator": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(DamagedFileError, match="attack.generator_weights=.*not a state dict of tensors"):
        engine(generator_weights=str(tmp_path / "list.pt"))
    with pytest.raises(ValueError, match="attack.generator_weights=.*is not a file"):
        engine(generator_weights=str(tmp_path / "none.pt"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("ngf", 0, "attack.ngf must be an integer >= 1 or null; got 0"),
        ("blocks", -1, "attack.blocks must be an integer >= 0 or null; got -1"),
        ("lr", 0.0, "attack.lr must be a positive number; got 0.0"),
        ("batch_size", 0, "attack.batch_size must be an integer >= 1; got 0"),
    ],
)
def test_options_are_checked_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        GAP(ThreatModel.parse(10, "inf"), **{key: value})


def test_compute_uap_and_run_passes_take_gap():
    """compute_uap(method="gap") returns a full-budget δ from the kept pass, and run_passes with
    the same settings returns the same."""
    model, images, held_out = digits_victim()
    result = compute_uap(model, images, eps=64, method="gap", max_passes=2, delta=0.01)
    v = result.perturbation
    assert v.shape == (1, 8, 8) and float(v.abs().max()) == pytest.approx(64 / 255, rel=1e-6)
    assert result.passes == 2 and len(result.history) == 2 and 0 <= fooling_rate(model, held_out, v) <= 1
    settings = AttackSettings(ThreatModel.parse(64, "inf"), method="gap", max_passes=2, delta=0.01)
    assert torch.equal(run_passes(model, settings, images, model(images).argmax(1)).perturbation, v)


@pytest.fixture(scope="module")
def victim_cache(tmp_path_factory) -> Path:
    """A victim cache the CLI tests share (the digits cnn is trained once)."""
    return tmp_path_factory.mktemp("victims")


def cli_config(make_cfg, cache: Path, *overrides: str):
    cfg = make_cfg(*CLI, *overrides)
    cfg.paths.cache_dir = str(cache)
    return cfg


def scalars(run_dir: Path, tag: str):
    """{step: value} of the scalar ``tag`` in the attack's TensorBoard events."""
    folder = next(
        path.parent for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*") if path.parent.name == "attack"
    )
    events = EventAccumulator(str(folder))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_the_cli_trains_the_generator_with_a_trainer_and_resumes(make_cfg, victim_cache, caplog):
    """attack=gap on the command line: a Lightning Trainer trains the generator, the run writes the
    usual files plus generator.pt (its δ is perturbation.pt) and last.ckpt, TensorBoard holds the
    training curve, and raising attack.max_passes from 1 to 2 trains one more epoch only. The
    perturbation is the one the engine's own passes reach."""
    first = run_task(cli_config(make_cfg, victim_cache, "attack.max_passes=1"))
    cfg = cli_config(make_cfg, victim_cache, "attack.max_passes=2")
    run_dir = Path(cfg.paths.output_dir)
    with caplog.at_level("INFO"):
        metrics = run_task(cfg)
    assert "continuing the generator saved after pass 1" in caplog.text
    assert metrics["method"] == "gap" and metrics["passes"] == 2
    assert [record["pass"] for record in metrics["history"]] == [1, 2]
    assert metrics["history"][0] == first["history"][0]  # pass 1 was not run again
    written = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "fooling_rate",
        "fooling_rate_attack_set",
        "clean_accuracy",
        "perturbed_accuracy",
        "norm_l2",
        "norm_linf",
        "eps",
        "p",
        "delta",
        "passes",
        "converged",
        "attack_seconds",
        "victim_accuracy",
        "attack_images",
        "eval_images",
        "history",
        "random_fooling_rate",
        "beats_random",
    ):
        assert key in written
    assert written["norm_linf"] == pytest.approx(64, rel=1e-5)
    for name in ("perturbation.npy", "perturbation.png", "curve.png", "last.ckpt"):
        assert (run_dir / name).is_file()

    v = torch.load(run_dir / "perturbation.pt", weights_only=True)
    weights = str(run_dir / "generator.pt")
    assert torch.equal(engine(seed=0, generator_weights=weights).perturbation(), v)

    for tag in ("train/fooling_loss", "train/fooling_rate_attack_set", "attack/fooling_rate"):
        assert len(scalars(run_dir, tag)) == 2, tag

    setup = prepare(cfg, validate(cfg))
    assert torch.equal(universal_perturbation(setup, folded_copy(setup.victim().net)).perturbation, v)


def test_an_interrupted_training_resumes_to_the_same_perturbation(make_cfg, victim_cache, tmp_path, monkeypatch):
    """Ctrl-C after epoch 1 writes the outputs of pass 1 and raises KeyboardInterrupt; the same
    command then continues from last.ckpt to the perturbation of an uninterrupted run."""
    straight = cli_config(make_cfg, victim_cache, "attack.max_passes=2", "logger=none")
    straight.paths.output_dir = str(tmp_path / "straight")
    run_task(straight)
    save = ModelCheckpoint._save_checkpoint

    def save_then_interrupt(self, trainer, filepath):
        save(self, trainer, filepath)
        if trainer.current_epoch == 0:
            raise KeyboardInterrupt("test")

    cfg = cli_config(make_cfg, victim_cache, "attack.max_passes=2", "logger=none")
    with monkeypatch.context() as patch:
        patch.setattr(ModelCheckpoint, "_save_checkpoint", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt, match="interrupted after pass 1"):
            run_task(cfg)
    interrupted = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert interrupted["interrupted"] and interrupted["passes"] == 1
    resumed = run_task(cfg)
    assert resumed["passes"] == 2 and not resumed["interrupted"]
    read = lambda folder: torch.load(Path(folder) / "perturbation.pt", weights_only=True)  # noqa: E731
    assert torch.equal(read(cfg.paths.output_dir), read(straight.paths.output_dir))


def test_the_cli_refuses_what_the_trainer_cannot_take(make_cfg, tmp_path):
    """Weights of another shape name attack.generator_weights before any data or victim; so do
    augmentation and several attack devices."""
    path = tmp_path / "generator.pt"
    torch.save(generator_state(engine(shape=(3, 8, 8)).generator), path)
    with pytest.raises(ConfigError, match="attack.generator_weights=.*does not fit"):
        run_task(make_cfg(*CLI, f"attack.generator_weights={path}"))
    assert not (tmp_path / "cache").exists()  # refused before the victim was trained
    with pytest.raises(ConfigError, match="attack.augment=True is not supported"):
        run_task(make_cfg(*CLI, "attack.augment=true"))
