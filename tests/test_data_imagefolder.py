"""Class-folder datasets on tiny generated PNG/JPEG trees, their errors and the disk cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uap_lightning.config import DataConfig
from uap_lightning.data import DataNotFoundError, ImageFolderDataModule, build_datamodule, imagefolder
from uap_lightning.errors import DamagedFileError

CLASSES = ("cat", "dog", "fish")


def colour(label: int, index: int) -> tuple:
    """The solid RGB colour of image ``index`` of class ``label``."""
    return (40 * label + 10, 20 * index + 5, 200)


def make_tree(root: Path, test_name: str = "test", train_count: int = 4, test_count: int = 2):
    """Solid-colour 16×12 PNGs, one grey JPEG per train class and a stray text file."""
    for split, count in (("train", train_count), (test_name, test_count)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (16, 12), colour(label, index)).save(folder / f"{index:03d}.png")
            (folder / "notes.txt").write_text("not an image")
    for name in CLASSES:
        Image.new("L", (10, 10), 128).save(root / "train" / name / "999.jpg", quality=95)


def folder_cfg(root: Path, **overrides) -> DataConfig:
    fields = dict(
        name="imagefolder",
        root=str(root),
        num_classes=3,
        in_channels=3,
        image_size=8,
        attack_images=3,
        val_fraction=0.0,
    )
    fields.update(overrides)
    return DataConfig(**fields)


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("images were decoded")

    monkeypatch.setattr(imagefolder, "decode_images", fail)


def test_tree_is_decoded_to_rgb_crops(tmp_path):
    make_tree(tmp_path)
    dm = build_datamodule(folder_cfg(tmp_path))
    assert isinstance(dm, ImageFolderDataModule)
    assert dm.class_names == list(CLASSES)
    assert dm.image_shape == (3, 8, 8)
    splits = dm.splits
    assert splits.train_images.dtype == torch.uint8
    assert splits.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert splits.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    first = splits.train_images[0]
    assert first.flatten(1).T.unique(dim=0).tolist() == [list(colour(0, 0))]
    grey = splits.train_images[4]  # 999.jpg sorts after the PNGs
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert (grey.int() - 128).abs().max() <= 2


def test_center_crop_takes_the_middle_without_resize(tmp_path):
    make_tree(tmp_path)
    pixels = np.arange(12 * 16 * 3, dtype=np.uint8).reshape(12, 16, 3)
    Image.fromarray(pixels).save(tmp_path / "train" / "cat" / "000.png")
    images = build_datamodule(folder_cfg(tmp_path)).splits.train_images
    expected = torch.from_numpy(pixels[2:10, 4:12]).permute(2, 0, 1)
    assert torch.equal(images[0], expected)


def test_resize_then_crop_and_upscaling_of_small_images(tmp_path):
    make_tree(tmp_path)
    dm = build_datamodule(folder_cfg(tmp_path, image_size=5, resize=6))
    images = dm.splits.train_images
    assert images.shape == (15, 3, 5, 5)
    assert images[1].flatten(1).T.unique(dim=0).tolist() == [list(colour(0, 1))]
    large = build_datamodule(folder_cfg(tmp_path, image_size=14)).splits.train_images
    assert large.shape == (15, 3, 14, 14)
    assert large[2].flatten(1).T.unique(dim=0).tolist() == [list(colour(0, 2))]
    with pytest.raises(ValueError, match="data.resize=4 is smaller than data.image_size=5"):
        build_datamodule(folder_cfg(tmp_path, image_size=5, resize=4))


def test_class_subset_and_images_per_class(tmp_path):
    make_tree(tmp_path)
    cfg = folder_cfg(tmp_path, class_subset=["fish", "cat"], images_per_class=2, num_classes=2, attack_images=2)
    dm = build_datamodule(cfg)
    assert dm.class_names == ["cat", "fish"]
    assert dm.folder_class_indices == [0, 2]
    splits = dm.splits
    assert splits.train_labels.tolist() == [0, 0, 1, 1]
    colours = splits.train_images[:, :, 0, 0].tolist()
    assert colours == [list(colour(label, index)) for label in (0, 2) for index in (0, 1)]
    images, labels = dm.attack_set()
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]


def test_unknown_class_subset_lists_the_available_classes(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError, match=r"\[bird\]; available classes: \[cat, dog, fish\]"):
        build_datamodule(folder_cfg(tmp_path, class_subset=["bird", "cat"])).setup()


def test_val_folder_replaces_a_missing_test_folder(tmp_path):
    make_tree(tmp_path, test_name="val", test_count=3)
    dm = build_datamodule(folder_cfg(tmp_path, eval_images=6))
    images, labels = dm.eval_set()
    assert images.shape == (6, 3, 8, 8) and labels.bincount().tolist() == [2, 2, 2]
    assert dm.splits.test_labels.numel() == 9


@pytest.mark.parametrize(
    "breakage, error, message",
    [
        (lambda root: root / "absent", DataNotFoundError, r"data.root .*absent does not exist"),
        (lambda root: (root / "train").mkdir() or root, DataNotFoundError, "neither a test/ nor a val/ folder"),
        (lambda root: (root / "test").mkdir() or root, DataNotFoundError, "has no train/ folder"),
        (
            lambda root: [(root / s).mkdir() for s in ("train", "test")] and root,
            DataNotFoundError,
            "has no class folders",
        ),
    ],
)
def test_layout_errors_name_the_problem(tmp_path, breakage, error, message):
    root = breakage(tmp_path)
    with pytest.raises(error, match=message):
        build_datamodule(folder_cfg(root)).setup()


def test_empty_class_folder_and_differing_class_sets(tmp_path, monkeypatch):
    forbid_decoding(monkeypatch)
    make_tree(tmp_path)
    (tmp_path / "train" / "eel").mkdir()
    (tmp_path / "test" / "eel").mkdir()
    with pytest.raises(DataNotFoundError, match=r"class folder .*eel has no images"):
        build_datamodule(folder_cfg(tmp_path, num_classes=4)).setup()
    (tmp_path / "test" / "eel").rmdir()
    with pytest.raises(ValueError, match=r"only in train/: \[eel\]; only in test/: \[\]"):
        build_datamodule(folder_cfg(tmp_path)).setup()


def test_oversized_attack_set_fails_before_decoding(tmp_path, monkeypatch):
    forbid_decoding(monkeypatch)
    make_tree(tmp_path)
    with pytest.raises(ValueError, match="data.attack_images=16 exceeds the 15 training images"):
        build_datamodule(folder_cfg(tmp_path, attack_images=16)).setup()


def test_second_load_comes_from_the_disk_cache(tmp_path, monkeypatch):
    root, cache_dir = tmp_path / "images", tmp_path / "cache"
    make_tree(root)
    first = build_datamodule(folder_cfg(root), cache_dir=str(cache_dir)).splits
    cached = list((cache_dir / "datasets").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".pt"

    with monkeypatch.context() as patch:
        forbid_decoding(patch)
        second = build_datamodule(folder_cfg(root), cache_dir=str(cache_dir)).splits
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert second.class_names == first.class_names

    changed = root / "test" / "dog" / "001.png"
    Image.new("RGB", (16, 12), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(0, 0))
    third = build_datamodule(folder_cfg(root), cache_dir=str(cache_dir)).splits
    assert third.test_images[3, :, 0, 0].tolist() == [1, 2, 3]
    assert len(list((cache_dir / "datasets").iterdir())) == 2

    build_datamodule(folder_cfg(root, image_size=6), cache_dir=str(cache_dir)).setup()
    assert len(list((cache_dir / "datasets").iterdir())) == 3


def test_unreadable_cache_file_is_decoded_again(tmp_path):
    root, cache_dir = tmp_path / "images", tmp_path / "cache"
    make_tree(root)
    build_datamodule(folder_cfg(root), cache_dir=str(cache_dir)).setup()
    (cached,) = (cache_dir / "datasets").iterdir()
    cached.write_bytes(b"truncated")
    images = build_datamodule(folder_cfg(root), cache_dir=str(cache_dir)).splits.train_images
    assert images.shape == (15, 3, 8, 8)


@pytest.mark.slow
def test_real_cifar10_copy(tmp_path):
    data_dir = os.environ.get("UAP_DATA_DIR")
    root = Path(data_dir) / "cifar10-jpeg" if data_dir else None
    if root is None or not root.is_dir():
        pytest.skip("UAP_DATA_DIR does not point to a folder containing cifar10-jpeg")
    cfg = DataConfig(
        name="imagefolder", root=str(root), num_classes=10, in_channels=3, image_size=32, attack_images=500
    )
    dm = build_datamodule(cfg, cache_dir=str(tmp_path))
    splits = dm.splits
    assert splits.train_images.shape == (50000, 3, 32, 32)
    assert splits.test_images.shape == (10000, 3, 32, 32)
    assert dm.num_classes == 10 and dm.class_names[0] == "airplane"
    assert splits.train_labels.bincount().tolist() == [5000] * 10
    images, labels = dm.attack_set()
    assert images.shape == (500, 3, 32, 32) and labels.bincount().tolist() == [50] * 10


def test_a_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) of value 108·257 decodes to grey 108, not to clipped white;
    the full 16-bit range maps onto 0–255."""
    make_tree(tmp_path)
    ramp = np.array([[0, 108 * 257], [65535, 108 * 257]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    Image.fromarray(np.full((16, 16), 108 * 257, dtype=np.uint16)).save(tmp_path / "train" / "cat" / "000.png")
    Image.fromarray(ramp).save(tmp_path / "train" / "cat" / "001.png")
    assert Image.open(tmp_path / "train" / "cat" / "000.png").mode == "I;16"
    images = build_datamodule(folder_cfg(tmp_path, image_size=16)).splits.train_images
    assert images[0].float().mean().item() == 108.0
    corners = images[1][:, [0, 0, 15, 15], [0, 15, 0, 15]]
    assert corners.tolist() == [[0, 108, 255, 108]] * 3


@pytest.mark.parametrize(
    "make_loop, looping",
    [
        (lambda root: os.symlink("loop.png", root / "train" / "cat" / "loop.png"), "train/cat/loop.png"),
        (
            lambda root: (
                os.symlink("b.png", root / "train" / "cat" / "a.png"),
                os.symlink("a.png", root / "train" / "cat" / "b.png"),
            ),
            "train/cat/a.png",
        ),
        (lambda root: os.symlink("eel", root / "test" / "eel"), "test/eel"),
        (lambda root: (shutil.rmtree(root / "test"), os.symlink("test", root / "test")), "test"),
    ],
    ids=["image-to-itself", "two-images", "class-folder", "split-folder"],
)
def test_a_symbolic_link_loop_is_named(tmp_path, monkeypatch, make_loop, looping):
    """A symbolic link that leads back to itself (an image, a class or a split folder) ends in one
    DamagedFileError naming it, before any image is decoded."""
    forbid_decoding(monkeypatch)
    make_tree(tmp_path)
    make_loop(tmp_path)
    with pytest.raises(DamagedFileError) as info:
        build_datamodule(folder_cfg(tmp_path)).setup()
    message = str(info.value)
    assert str(tmp_path / looping) in message and "loop" in message and "\n" not in message


def sample_tree(root: Path, rows: list) -> DataConfig:
    """``root/val/<wnid>/0.png`` for three wnids and a classes.tsv of ``rows`` (index, wnid, name)."""
    for label, wnid in enumerate(("n00", "n01", "n02")):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (40 * label, 10 * index, 90)).save(folder / f"{index}.png")
    lines = ["index\twnid\tname"] + ["\t".join(map(str, row)) for row in rows]
    (root / "classes.tsv").write_text("\n".join(lines) + "\n")
    return DataConfig(
        name="sample_folder",
        root=str(root),
        in_channels=3,
        image_size=8,
        attack_images=3,
        class_names_file="classes.tsv",
    )


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [(0, "n00", "tench"), (1, "n01", "goldfish"), (2, "n01", "shark"), (3, "n02", "ray")],
            r"wnid n01 on lines 3 and 4",
        ),
        ([(0, "n00", "tench"), (1, "n01", "goldfish"), (1, "n02", "shark")], r"index 1 on lines 3 and 4"),
    ],
    ids=["wnid", "index"],
)
def test_a_class_names_file_with_a_duplicate_id_is_refused(tmp_path, monkeypatch, rows, message):
    """A classes.tsv naming one wnid (or index) twice would let the later line silently win: refused,
    naming the id and both lines, before any image is decoded."""
    forbid_decoding(monkeypatch)
    cfg = sample_tree(tmp_path, rows)
    with pytest.raises(DamagedFileError, match=message) as info:
        build_datamodule(cfg).setup()
    assert "classes.tsv" in str(info.value)


def test_a_class_names_file_without_duplicates_names_the_classes(tmp_path):
    cfg = sample_tree(tmp_path, [(0, "n00", "tench"), (1, "n01", "goldfish"), (2, "n02", "shark")])
    assert build_datamodule(cfg).class_names == ["tench", "goldfish", "shark"]
