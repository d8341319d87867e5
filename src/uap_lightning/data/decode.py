"""Decoding image files into one uint8 tensor: RGB, shorter side resized, center-cropped."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from uap_lightning.errors import DamagedFileError


def default_threads() -> int:
    """Decoding threads: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def load_rgb(path: str, image_size: int, resize: Optional[int]) -> np.ndarray:
    """One file as uint8 ``image_size``×``image_size``×3.

    The shorter side is resized (bilinear, antialiased) to ``resize`` when given, or up to
    ``image_size`` when it is smaller; then the center square is cropped. Grey and
    palette images are converted to RGB.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as err:
        raise DamagedFileError(f"cannot decode image {path}: {err}") from err
    width, height = image.size
    target = resize if resize is not None else max(image_size, min(width, height))
    if min(width, height) != target:
        if width <= height:
            size = (target, int(target * height / width))
        else:
            size = (int(target * width / height), target)
        image = image.resize(size, Image.Resampling.BILINEAR)
        width, height = image.size
    top = int(round((height - image_size) / 2.0))
    left = int(round((width - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def decode_images(
    paths: Sequence[str],
    image_size: int,
    resize: Optional[int] = None,
    threads: Optional[int] = None,
) -> Tensor:
    """All ``paths`` decoded by :func:`load_rgb` in parallel threads.

    Returns uint8 N×3×S×S, S = ``image_size``, in the order of ``paths``.
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)

    def fill(position: int) -> None:
        out[position] = load_rgb(paths[position], image_size, resize)

    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        for _ in pool.map(fill, range(len(paths))):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
