"""Images in class folders: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val/``).

Every file is decoded once to RGB, its shorter side resized to ``data.resize`` (when set)
and the center ``data.image_size`` square cropped; the uint8 result is cached on disk.
Symbolic links are followed; one that leads back to itself is refused, naming it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from uap_lightning.errors import ConfigError, DamagedFileError, DataNotFoundError

from . import cache
from .base import Splits, UAPDataModule, config_value, register_dataset
from .decode import decode_images, default_threads

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_FORMAT = 2  # bump when the decoding or the key changes, so older cache files are not reused
LAYOUT = "root/train/<class>/*.jpg and root/test/<class>/*.jpg (or root/val/<class>/)"

FileEntry = Tuple[str, str]  # path relative to root, hex digest of the file's bytes


def file_digest(path: Path) -> str:
    """Hex BLAKE2b digest (16 bytes) of the file's bytes."""
    with open(path, "rb") as handle:
        if sys.version_info >= (3, 11):
            return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        digest = hashlib.blake2b(digest_size=16)  # Python 3.10: no hashlib.file_digest
        for chunk in iter(lambda: handle.read(1 << 18), b""):
            digest.update(chunk)
        return digest.hexdigest()


def _shown(names: Sequence[str], limit: int = 100) -> str:
    listed = ", ".join(names[:limit])
    return listed if len(names) <= limit else f"{listed}, ... ({len(names)} in all)"


def _mode(path: str | os.PathLike) -> int:
    """The file type bits of ``path``, links followed (0 when it does not exist or cannot be
    reached); DamagedFileError naming a symbolic link that leads back to itself."""
    try:
        return os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DamagedFileError(
                f"{path} is a symbolic link that leads back to itself (a loop); remove it or point it at an "
                "image or a folder"
            ) from None
        return 0


def is_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder, links followed (see :func:`_mode` for a link loop)."""
    return stat.S_ISDIR(_mode(path))


def _class_folders(split_dir: Path) -> List[str]:
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and is_folder(e.path))


def _image_names(class_dir: Path) -> List[str]:
    with os.scandir(class_dir) as entries:
        return sorted(
            e.name
            for e in entries
            if not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            and stat.S_ISREG(_mode(e.path))
        )


@register_dataset
class ImageFolderDataModule(UAPDataModule):
    """Any class-folder dataset as uint8 3×S×S tensors (S = ``data.image_size``).

    ``data.class_subset`` keeps only the named class folders (labels follow their sorted
    order); ``data.images_per_class`` keeps the first files, in sorted order, of each class
    and split. ``folder_class_indices[label]`` is that class's position among all class
    folders of ``train/`` (for ImageNet's synset folders: the usual 1000-class index).
    Decoded splits are cached in ``cache_dir/datasets/`` when ``cache_dir`` is given.
    """

    name = "imagefolder"
    layout = LAYOUT  # the folder layout, for messages

    def __init__(self, cfg: Any, *, cache_dir: Optional[str] = None):
        super().__init__(cfg, cache_dir=cache_dir)
        image_size = config_value(cfg, "image_size")
        if image_size is None or int(image_size) <= 0:
            raise ConfigError(f"data.image_size must be a positive pixel count, got {image_size}")
        self.image_size = int(image_size)
        resize = config_value(cfg, "resize")
        self.resize: Optional[int] = None if resize is None else int(resize)
        if self.resize is not None and self.resize < self.image_size:
            raise ConfigError(f"data.resize={self.resize} is smaller than data.image_size={self.image_size}")
        subset = config_value(cfg, "class_subset")
        self.class_subset = None if subset is None else [str(name) for name in subset]
        if self.class_subset is not None and not self.class_subset:
            raise ConfigError("data.class_subset is empty; use null to keep every class")
        per_class = config_value(cfg, "images_per_class")
        self.images_per_class: Optional[int] = None if per_class is None else int(per_class)
        if self.images_per_class is not None and self.images_per_class <= 0:
            raise ConfigError(f"data.images_per_class must be positive or null, got {self.images_per_class}")
        self.folder_class_indices: Optional[List[int]] = None

    # -- listing ------------------------------------------------------------------------

    def _root(self) -> Path:
        root = config_value(self.cfg, "root")
        if root is None:
            raise ConfigError(f"data.root is not set: point it at a folder laid out as {self.layout}")
        path = Path(os.path.expanduser(str(root))).absolute()
        if not is_folder(path):
            raise DataNotFoundError(
                f"data.root {path} does not exist; put the images there ({self.layout}), point data.root at them, "
                "or set UAP_DATA_DIR to the folder that holds the data folders"
            )
        return path

    @staticmethod
    def _split_dirs(root: Path) -> Tuple[Path, Path]:
        train_dir = root / "train"
        if not is_folder(train_dir):
            raise DataNotFoundError(f"data.root {root} has no train/ folder; expected {LAYOUT}")
        for name in ("test", "val"):
            if is_folder(root / name):
                return train_dir, root / name
        raise DataNotFoundError(f"data.root {root} has neither a test/ nor a val/ folder; expected {LAYOUT}")

    def _classes(self, train_dir: Path, test_dir: Path) -> List[str]:
        """The kept class folder names, sorted; sets ``folder_class_indices``."""
        available = _class_folders(train_dir)
        if not available:
            raise DataNotFoundError(f"{train_dir} has no class folders; expected {self.layout}")
        in_test = _class_folders(test_dir)
        if in_test != available:
            only_train = sorted(set(available) - set(in_test))
            only_test = sorted(set(in_test) - set(available))
            raise ConfigError(
                f"class folders of {train_dir} and {test_dir} differ: only in "
                f"{train_dir.name}/: [{_shown(only_train)}]; only in {test_dir.name}/: "
                f"[{_shown(only_test)}]"
            )
        kept = available
        if self.class_subset is not None:
            unknown = sorted(set(self.class_subset) - set(available))
            if unknown:
                raise ConfigError(
                    f"data.class_subset names classes not found in {train_dir}: "
                    f"[{_shown(unknown)}]; available classes: [{_shown(available)}]"
                )
            kept = sorted(set(self.class_subset))
        position = {name: i for i, name in enumerate(available)}
        self.folder_class_indices = [position[name] for name in kept]
        return kept

    def _list_split(self, root: Path, split_dir: Path, classes: List[str]) -> List[FileEntry]:
        """(relative path, digest of its bytes) of the kept files, class by class: an image whose
        pixels change is a new file, whatever its size and time stamp."""
        paths: List[Path] = []
        for name in classes:
            class_dir = split_dir / name
            names = _image_names(class_dir)
            if not names:
                raise DataNotFoundError(f"class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += [class_dir / file_name for file_name in names[: self.images_per_class]]
        with ThreadPoolExecutor(max_workers=default_threads()) as pool:
            digests = list(pool.map(file_digest, paths))
        return [(str(path.relative_to(root)), digest) for path, digest in zip(paths, digests)]

    # -- loading ------------------------------------------------------------------------

    def load_splits(self) -> Splits:
        root = self._root()
        train_dir, test_dir = self._split_dirs(root)
        classes = self._classes(train_dir, test_dir)
        listing = {
            "train": self._list_split(root, train_dir, classes),
            "test": self._list_split(root, test_dir, classes),
        }
        self.check_sizes(len(listing["train"]), len(listing["test"]))
        return Splits(**self._decoded(root, listing, classes))

    def _decoded(self, root: Path, listing: Dict[str, List[FileEntry]], classes: List[str]) -> Dict[str, Any]:
        """``{<split>_images, <split>_labels, class_names}`` of the listed files, decoded (uint8
        N×3×S×S) or read from the disk cache; labels follow the order of ``classes``."""
        cache_path = None
        if self.cache_dir is not None:
            key = {
                "format": CACHE_FORMAT,
                "root": str(root),
                "files": listing,
                "image_size": self.image_size,
                "resize": self.resize,
            }
            cache_path = cache.cache_file(self.cache_dir, key)
            cached = cache.load(cache_path)
            if cached is not None and cached.pop("key", None) == key:
                log.info("loaded decoded images of %s from %s", root, cache_path)
                return cached
            if cached is not None:
                log.warning(
                    "the decoded-dataset cache %s holds other images than %s; decoding them again", cache_path, root
                )
        label_of = {name: label for label, name in enumerate(classes)}
        tensors: Dict[str, Any] = {"class_names": classes}
        start = time.perf_counter()
        for split, files in listing.items():
            paths = [str(root / rel) for rel, _ in files]
            tensors[f"{split}_images"] = decode_images(
                paths, self.image_size, self.resize, max_pixels=config_value(self.cfg, "max_image_pixels")
            )
            tensors[f"{split}_labels"] = torch.tensor(
                [label_of[Path(rel).parent.name] for rel, _ in files], dtype=torch.int64
            )
        log.info(
            "decoded %d images of %s in %.1f s",
            sum(len(f) for f in listing.values()),
            root,
            time.perf_counter() - start,
        )
        if cache_path is not None:
            cache.save({**tensors, "key": key}, cache_path)
        return tensors
