"""The shared datamodule base on scikit-learn's digits: splits, loaders, attack and eval sets."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from uap_lightning.config import DataConfig
from uap_lightning.data import DigitsDataModule, build_datamodule
from uap_lightning.data.sampling import balanced_indices


def digits_cfg(**overrides) -> DataConfig:
    fields = dict(name="digits", num_classes=10, in_channels=1, image_size=8, attack_images=50)
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = build_datamodule(digits_cfg())
    dm.setup()
    return dm


def test_digits_shapes_range_and_classes(digits):
    assert isinstance(digits, DigitsDataModule)
    assert digits.image_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.class_names == [str(d) for d in range(10)]
    assert digits.mean == (0.0,) and digits.std == (1.0,)
    splits = digits.splits
    assert splits.train_labels.numel() + splits.test_labels.numel() == 1797
    assert splits.test_labels.numel() == 360
    assert splits.test_labels.bincount().min() >= 35  # stratified
    images, labels = next(iter(digits.train_dataloader()))
    assert images.shape == (128, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() == 1.0


def test_validation_hold_out_is_disjoint_from_the_fit_set(digits):
    fit = digits.train_dataloader().dataset.indices
    val = digits.val_dataloader().dataset.indices
    num_train = digits.splits.train_labels.numel()
    assert val.numel() == round(0.1 * num_train)
    assert torch.equal(torch.cat([fit, val]).sort().values, torch.arange(num_train))
    assert len(digits.test_dataloader().dataset) == 360


def test_attack_set_is_balanced_deterministic_and_from_the_fit_set(digits):
    images, labels = digits.attack_set()
    assert images.shape == (50, 1, 8, 8) and images.dtype == torch.float32
    assert labels.bincount(minlength=10).tolist() == [5] * 10
    again, again_labels = build_datamodule(digits_cfg()).attack_set()
    assert torch.equal(images, again) and torch.equal(labels, again_labels)

    fit_rows = digits.train_dataloader().dataset.indices
    fit = digits.splits.train_images[fit_rows].flatten(1)
    assert (images.flatten(1)[:, None] == fit[None]).all(-1).any(1).all()

    other, _ = build_datamodule(digits_cfg(split_seed=1)).attack_set()
    assert not torch.equal(images, other)


def test_smaller_attack_set_is_a_subset_of_a_larger_one():
    small, _ = build_datamodule(digits_cfg(attack_images=20)).attack_set()
    large, _ = build_datamodule(digits_cfg(attack_images=60)).attack_set()
    assert (small.flatten(1)[:, None] == large.flatten(1)[None]).all(-1).any(1).all()


def test_eval_set_defaults_to_all_of_test_in_file_order(digits):
    images, labels = digits.eval_set()
    assert torch.equal(images, digits.splits.test_images)
    assert torch.equal(labels, digits.splits.test_labels)

    dm = build_datamodule(digits_cfg(eval_images=40))
    some, some_labels = dm.eval_set()
    assert some.shape == (40, 1, 8, 8)
    assert some_labels.bincount(minlength=10).tolist() == [4] * 10
    assert torch.equal(some, build_datamodule(digits_cfg(eval_images=40)).eval_set()[0])


def test_dictconfig_with_missing_fields_is_accepted():
    cfg = OmegaConf.structured(DataConfig)
    cfg.name = "digits"
    dm = build_datamodule(cfg)
    assert dm.num_classes == 10 and dm.attack_set()[0].shape[0] == 500


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attack_images=0), "data.attack_images must be positive"),
        (dict(eval_images=-1), "data.eval_images must be positive"),
        (dict(val_fraction=1.0), "data.val_fraction"),
        (dict(batch_size=0), "data.batch_size"),
    ],
)
def test_invalid_settings_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_datamodule(digits_cfg(**overrides))


def test_attack_set_larger_than_the_fit_set_is_rejected():
    with pytest.raises(ValueError, match=r"data.attack_images=2000 exceeds the 1293 training"):
        build_datamodule(digits_cfg(attack_images=2000)).setup()


def test_eval_set_larger_than_test_is_rejected():
    with pytest.raises(ValueError, match=r"data.eval_images=361 exceeds the 360"):
        build_datamodule(digits_cfg(eval_images=361)).setup()


def test_config_that_contradicts_the_data_is_rejected():
    with pytest.raises(ValueError, match=r"data.num_classes=5 .*set data.num_classes=10"):
        build_datamodule(digits_cfg(num_classes=5)).setup()
    with pytest.raises(ValueError, match="data.mean has 3 values"):
        build_datamodule(digits_cfg(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])).setup()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown data.name='svhn'.*digits.*imagefolder.*sample_folder.*cifar10"):
        build_datamodule(digits_cfg(name="svhn"))


def test_balanced_indices_fills_from_the_larger_classes():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    assert labels[balanced_indices(labels, 8, seed=0)].bincount().tolist() == [3, 2, 3]
    chosen = balanced_indices(labels, 9, seed=0)
    assert sorted(labels[chosen].bincount().tolist()) == [2, 3, 4]
    assert torch.equal(chosen, chosen.sort().values)
    assert torch.equal(chosen, balanced_indices(labels, 9, seed=0))
    with pytest.raises(ValueError):
        balanced_indices(labels, 18, seed=0)


def test_one_image_per_class_is_drawn_at_random_not_by_label_order():
    """With one image per class a draw of half the classes depends on the seed and spans the labels."""
    labels = torch.arange(1000)
    first, second = balanced_indices(labels, 500, seed=0), balanced_indices(labels, 500, seed=1)
    assert 150 < len(set(first.tolist()) & set(second.tolist())) < 350
    assert 150 < int((first < 500).sum()) < 350
    assert set(balanced_indices(labels, 100, seed=0).tolist()) <= set(first.tolist())


def test_training_batches_keep_shape_and_range():
    dm = build_datamodule(digits_cfg(batch_size=32))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and labels.shape == (32,)
    assert 0.0 <= images.min() and images.max() <= 1.0
    single, label = dm.train_dataloader().dataset[0]
    assert single.shape == (1, 8, 8) and isinstance(label, int)
