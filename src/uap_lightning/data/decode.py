"""Decoding image files into one uint8 tensor: RGB, shorter side resized, center-cropped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from uap_lightning.errors import ConfigError, DamagedFileError
from uap_lightning.threads import available_cores


def default_threads() -> int:
    """Decoding threads: the CPUs this process may use, at most 8."""
    return max(1, min(8, available_cores()))


def load_rgb(path: str, image_size: int, resize: Optional[int], max_pixels: Optional[int] = None) -> np.ndarray:
    """One file as uint8 ``image_size``×``image_size``×3.

    The shorter side is resized (bilinear, antialiased) to ``resize`` when given, or up to
    ``image_size`` when it is smaller; then the center square is cropped (torchvision's
    ``resize`` and ``center_crop``). Grey and palette images are converted to RGB; 16-bit grey
    (PIL modes ``I;16*``) is scaled from 0–65535 to 0–255 first. An image of more
    than ``max_pixels`` pixels (None: PIL's decompression-bomb limit) is refused before decoding.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(path) as image:
            if limit is not None and image.width * image.height > limit:
                raise ConfigError(
                    f"image {path} has {image.width}×{image.height} pixels, more than data.max_image_pixels={limit} "
                    "(a guard against decompression bombs); raise data.max_image_pixels for a file you trust"
                )
            if image.mode.startswith("I;16"):  # convert("RGB") would clip 0–65535 at 255
                image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float32) / 257).astype(np.uint8))
            image = image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ConfigError(f"image {path}: {err}; raise data.max_image_pixels for a file you trust") from None
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise DamagedFileError(f"cannot decode image {path}: {err}") from err
    target = resize if resize is not None else max(image_size, min(image.size))
    if min(image.size) != target:
        image = F.resize(image, target, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(F.center_crop(image, [image_size, image_size]), dtype=np.uint8)


def decode_images(
    paths: Sequence[str],
    image_size: int,
    resize: Optional[int] = None,
    threads: Optional[int] = None,
    max_pixels: Optional[int] = None,
) -> Tensor:
    """All ``paths`` decoded by :func:`load_rgb` in parallel threads.

    Returns uint8 N×3×S×S, S = ``image_size``, in the order of ``paths``.
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)

    def fill(position: int) -> None:
        out[position] = load_rgb(paths[position], image_size, resize, max_pixels)

    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        for _ in pool.map(fill, range(len(paths))):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
