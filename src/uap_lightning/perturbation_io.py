"""Read universal perturbations published by others (or written here), and write them.

Inside the project a perturbation is a float32 C×H×W tensor in [0,1] image scale: an ℓ∞
budget of ξ=10 in 0–255 pixel units is 10/255 here. Authors usually publish H×W×C arrays
in 0–255 pixel units (values like ±10); ``read_perturbation`` turns any supported file
into the project's form, refusing rather than guessing where a file is unclear.

Files are read without unpickling: ``numpy.load(allow_pickle=False)`` and
``torch.load(weights_only=True)``; a file that holds Python objects is refused, naming them. A
``.npy`` header is checked against the file's size before any array is allocated.
"""

from __future__ import annotations

import math
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Sequence, Tuple, cast

import numpy as np
import scipy.io
import torch
from torch import Tensor

from uap_lightning import tensors_only
from uap_lightning.atomic import atomic_write
from uap_lightning.errors import ConfigError, DamagedFileError, NotFoundError, UntrustedFileError, UserError
from uap_lightning.units import PIXEL_SCALE, to_pixel_units

LAYOUTS = ("hwc", "chw")  # perturbation.layout: axis order of a 3-D array in the file
SCALES = (255, 1)  # perturbation.scale: 0–255 pixel units, or [0,1] image scale
SUFFIXES = (".npy", ".npz", ".mat", ".pt", ".pth")

_PICKLE_START = b"\x80"  # first byte of every pickle of protocol 2 or later
RUN_FOLDER_FILE = "perturbation.pt"  # what a run folder of this project holds: C×H×W, [0,1] scale


def check_reading(path: str | os.PathLike[str], *, layout: Optional[str] = None, scale: Optional[float] = None) -> None:
    """Refuse, before any heavy work, a path that is neither a supported file nor a run folder
    holding ``perturbation.pt``, and an unknown layout or scale."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_FOLDER_FILE
        if not path.is_file():
            raise ConfigError(f"{path.parent} holds no {RUN_FOLDER_FILE}; give a perturbation file or a run folder")
    _check_settings(path, layout, scale)
    if not path.is_file():
        raise NotFoundError(
            f"perturbation file {path} does not exist or is not a file; set perturbation.path to a file"
        )


def read_perturbation_source(
    path: str | os.PathLike[str],
    *,
    shape: Optional[Tuple[int, int, int]] = None,
    layout: Optional[str] = None,
    scale: Optional[float] = None,
    key: Optional[str] = None,
) -> Tensor:
    """:func:`read_perturbation` of a file, or of the ``perturbation.pt`` (C×H×W, [0,1] scale)
    in a run folder of this project (``layout``, ``scale`` and ``key`` then do not apply, and v is
    read as the attack made it: an ℓ2 perturbation may hold entries beyond ±1, void once x+v is
    clipped)."""
    path = Path(path)
    if path.is_dir():
        return _read(path / RUN_FOLDER_FILE, shape, "chw", 1, None)[0]
    return read_perturbation(path, shape=shape, layout=layout, scale=scale, key=key)


def read_perturbation(
    path: str | os.PathLike[str],
    *,
    shape: Optional[Tuple[int, int, int]] = None,
    layout: Optional[str] = None,
    scale: Optional[float] = None,
    key: Optional[str] = None,
) -> Tensor:
    """The perturbation stored at ``path`` as a float32 C×H×W tensor in [0,1] image scale.

    Formats, by suffix: ``.npy``, ``.npz`` (``key`` picks the array; default: the only
    one), ``.mat`` (``key`` picks the variable; default: the only one whose name does not
    start with ``__``), ``.pt``/``.pth`` (a tensor, or a dict holding one tensor under
    ``key`` or as its only tensor value). ``key`` does not apply to a file holding one
    unnamed array (``.npy``, a bare tensor), so one ``key`` serves a list of mixed files.
    Nothing is unpickled.

    ``layout`` ("hwc" or "chw"; None infers it):
      * a leading batch axis of length 1 (4 dims) is dropped;
      * 2 dims are one grey channel: H×W → 1×H×W (whatever ``layout`` says);
      * 3 dims: the last axis of length 1 or 3 and the first not → hwc; the first of
        length 1 or 3 and the last not → chw; anything else is refused as ambiguous.

    ``scale`` (255 for 0–255 pixel units, 1 for [0,1] image scale; None infers it): max |v|
    > 1 means 255, else 1. Limit: a 0–255 perturbation whose every |value| is ≤ 1 is read
    as [0,1]-scale, so pass ``scale=255`` for such a file. No image changes by more than 255
    pixel units, so a file holding |v| > 255 in its units is refused.

    ``shape`` (C, H, W), when given, must match the result; nothing is resized.

    Raises NotFoundError for a missing file, ConfigError for settings that do not fit the
    file (suffix, key, layout, scale, shape, values beyond ±255 pixel units), UntrustedFileError
    for pickled contents (naming the Python objects) and DamagedFileError for unreadable,
    non-numeric or non-finite contents and for a header declaring more data than the file holds.
    """
    v, source, used_scale = _read(Path(path), shape, layout, scale, key)
    _check_range(v, source, used_scale, explicit=scale is not None)
    return v


def _read(
    path: Path, shape: Optional[Tuple[int, int, int]], layout: Optional[str], scale: Optional[float], key: Optional[str]
) -> Tuple[Tensor, str, float]:
    """(the C×H×W [0,1]-scale tensor of :func:`read_perturbation`, a label naming the file and key,
    the scale used), without the range check."""
    _check_settings(path, layout, scale)
    if not path.is_file():
        raise NotFoundError(
            f"perturbation file {path} does not exist or is not a file; set perturbation.path to a file"
        )
    array, source = _load(path, key, None if shape is None else math.prod(shape))
    v, used = _as_chw(_as_float32(array, source), source, layout)
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise ConfigError(
            f"{source} holds an array of shape {_shape(array.shape)}, read with layout={used} as C×H×W "
            f"{_shape(v.shape)}, but C×H×W {_shape(shape)} is expected; use a perturbation of that size "
            "(nothing is resized), or set perturbation.layout=hwc|chw if the axes were misread"
        )
    used_scale = _scale_of(v, scale)
    return (v / used_scale).contiguous(), source, used_scale


def _check_range(v: Tensor, source: str, scale: float, explicit: bool) -> None:
    """ConfigError when the [0,1]-scale ``v`` (read from ``source`` in ``scale``) holds |v| > 1: more
    than 255 pixel units, which no image can change by, so the file's units are not the ones read."""
    peak = float(v.abs().max()) if v.numel() else 0.0
    if peak <= 1.0:
        return
    if scale == 1.0:
        raise ConfigError(
            f"perturbation.scale=1 reads {source} in [0,1] scale, but its largest |value| is {peak:g}, beyond the "
            "±1 an image can change by; set perturbation.scale=255 if the file is in 0–255 pixel units"
        )
    why = "perturbation.scale=255" if explicit else "inferred, as some |value| exceeds 1"
    raise ConfigError(
        f"{source} is read in 0–255 pixel units ({why}), but its largest |value| is {peak * scale:g}, beyond the ±255 "
        "an image can change by: the file holds other units (e.g. 0–65535) or is damaged; save the perturbation "
        "in 0–255 pixel units or in [0,1] scale"
    )


def write_perturbation_npy(path: str | os.PathLike[str], perturbation: Tensor) -> None:
    """Write a C×H×W [0,1]-scale perturbation to ``path`` as an H×W×C float32 ``.npy`` in
    0–255 pixel units (the form authors publish in), atomically."""
    if perturbation.dim() != 3:
        raise ValueError(f"a perturbation is C×H×W, got shape {tuple(perturbation.shape)}")
    hwc = to_pixel_units(perturbation.detach().to("cpu", torch.float32)).permute(1, 2, 0).contiguous().numpy()
    atomic_write(path, lambda f: np.save(f, hwc, allow_pickle=False))


def _check_settings(path: Path, layout: Optional[str], scale: Optional[float]) -> None:
    """Refuse an unsupported suffix, layout or scale before touching the file."""
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(
            f"perturbation file {path} has an unsupported suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"perturbation.layout={layout} is not supported; use one of {', '.join(LAYOUTS)}")
    if scale is not None and scale not in SCALES:
        raise ConfigError(f"perturbation.scale={scale} is not supported; use one of {', '.join(map(str, SCALES))}")


def _load(path: Path, key: Optional[str], values: Optional[int] = None) -> Tuple[Any, str]:
    """(the array or tensor ``path`` holds, a label naming the file and key for messages); an array
    of a ``.npz`` archive whose header declares another number of values than ``values`` (None:
    any) is refused before it is decompressed (a few kilobytes can hold gigabytes of zeros)."""
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _load_numpy(path, key, values)
    if suffix == ".mat":
        return _pick(_load_mat(path), key, path, "variable")
    return _load_torch(path, key)


def _load_numpy(path: Path, key: Optional[str], values: Optional[int] = None) -> Tuple[np.ndarray, str]:
    """The array of a ``.npy`` file, or the one ``key`` picks from a ``.npz`` archive; each header
    is checked against the bytes that follow it, and against ``values`` (see :func:`_load`), before
    the array is read (or, in an archive, decompressed)."""
    with _numpy_errors(path):
        with open(path, "rb") as handle:  # a .npy holds its data on disk: its size is checked after reading
            _check_data_size(handle, path.stat().st_size, str(path))
        loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded, str(path)
    with loaded:
        name, source = _pick({name: name for name in loaded.files}, key, path, "array")
        archive = cast(zipfile.ZipFile, loaded.zip)  # None only once the archive is closed
        member = f"{name}.npy" if f"{name}.npy" in archive.namelist() else name
        with _numpy_errors(path):
            with archive.open(member) as handle:
                _check_data_size(handle, archive.getinfo(member).file_size, source, values)
            return loaded[name], source


def _check_data_size(handle: IO[bytes], size: int, source: str, values: Optional[int] = None) -> None:
    """DamagedFileError when the ``.npy`` header at the start of ``handle`` (``size`` bytes in all)
    declares more data than follows it, so that a forged header allocates nothing; ConfigError when
    it declares another number of values than ``values`` (None: any), so that an array of the wrong
    size is never decompressed; anything but a ``.npy`` is left to numpy."""
    if handle.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
        return
    handle.seek(0)
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(handle)
    if values is not None and math.prod(shape) != values:
        raise ConfigError(
            f"{source} holds an array of shape {_shape(shape)} ({math.prod(shape)} values), but a perturbation of "
            f"{values} values is expected (C×H×W of the images); use a perturbation of that size (nothing is "
            "resized); its data was not read"
        )
    needed = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and needed > size - handle.tell():
        raise DamagedFileError(
            f"perturbation file {source} is truncated or damaged: its header declares a {dtype} array of shape "
            f"{_shape(shape)} ({needed} bytes of data), but the file holds {size} bytes; point perturbation.path "
            "at an intact file"
        )


@contextmanager
def _numpy_errors(path: Path) -> Iterator[None]:
    """Turn numpy's failures to read ``path`` into UntrustedFileError or DamagedFileError."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # numpy raises many types for a truncated or foreign file
        if _pickled(path, err):
            raise _untrusted(path) from None
        raise _damaged(path, err) from None


def _load_mat(path: Path) -> Mapping[str, Any]:
    """The variables of a MATLAB file (v7 or older), without scipy's ``__header__``-style entries."""
    try:
        variables = scipy.io.loadmat(path)
    except NotImplementedError:  # scipy reads up to v7; v7.3 files are HDF5
        raise DamagedFileError(
            f"perturbation file {path} is a MATLAB v7.3 file, which cannot be read; save it again in "
            "MATLAB with save(PATH, NAME, '-v7')"
        ) from None
    except Exception as err:  # scipy raises many types for a truncated or foreign file
        raise _damaged(path, err) from None
    return {name: value for name, value in variables.items() if not name.startswith("__")}


def _load_torch(path: Path, key: Optional[str]) -> Tuple[Tensor, str]:
    """The tensor of a ``.pt``/``.pth`` file: the object itself, or a dict's tensor. Read tensors-only
    (:mod:`uap_lightning.tensors_only`); a file wanting other Python objects is refused, naming them."""
    try:
        obj = tensors_only.load(path)
    except tensors_only.Refused as refused:
        raise (_untrusted(path, refused.unsafe) if refused.unsafe else _damaged(path, refused.error)) from None
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise _damaged(path, err) from None
    if isinstance(obj, Tensor):
        return obj, str(path)
    if isinstance(obj, Mapping):
        tensors = {str(name): value for name, value in obj.items() if isinstance(value, Tensor)}
        return _pick(tensors, key, path, "tensor")
    raise DamagedFileError(
        f"perturbation file {path} holds a {type(obj).__name__}, not a tensor; save the perturbation "
        "itself with torch.save(v, PATH)"
    )


def _pick(named: Mapping[str, Any], key: Optional[str], path: Path, kind: str) -> Tuple[Any, str]:
    """(the entry of ``named`` that ``key`` names, or its only entry when ``key`` is None, label)."""
    names = ", ".join(sorted(named)) or "none"
    if key is not None and key not in named:
        raise ConfigError(f"{path} has no {kind} named {key!r} (it has: {names}); set perturbation.key to one of them")
    if key is None and len(named) != 1:
        if not named:
            raise DamagedFileError(f"perturbation file {path} holds no {kind}; point perturbation.path at another file")
        raise ConfigError(f"{path} holds several {kind}s ({names}); pick one with perturbation.key=NAME")
    name = key if key is not None else next(iter(named))
    return named[name], f"{path}[{name}]"


def _as_float32(array: Any, source: str) -> Tensor:
    """A numeric array or tensor as a float32 tensor; non-numeric or non-finite values are refused."""
    if not _is_real(array):
        raise DamagedFileError(
            f"{source} holds {array.dtype} values, not real numbers; save the perturbation as a float array"
        )
    if isinstance(array, Tensor):
        v = array.detach().to(torch.float32)
    else:
        v = torch.from_numpy(np.asarray(array, dtype=np.float32))
    if not bool(torch.isfinite(v).all()):
        raise DamagedFileError(f"{source} holds NaN or infinite values; use a perturbation whose values are all finite")
    return v


def _is_real(array: Any) -> bool:
    """Whether a numpy array or tensor holds integers or floats (not bools, complex or objects)."""
    if isinstance(array, Tensor):
        return not (array.is_complex() or array.dtype == torch.bool)
    return array.dtype.kind in "iuf"


def _as_chw(v: Tensor, source: str, layout: Optional[str]) -> Tuple[Tensor, str]:
    """(``v`` as C×H×W, the layout used): a batch axis of length 1 dropped, H×W read as
    1×H×W ("grey"), H×W×C permuted; ``layout`` None is inferred (see read_perturbation)."""
    if v.dim() == 4 and v.shape[0] == 1:
        v = v[0]
    if v.dim() == 2:
        return v.unsqueeze(0), "grey"
    if v.dim() != 3:
        raise ConfigError(
            f"{source} holds an array of shape {_shape(v.shape)}; a perturbation is H×W×C or C×H×W "
            "(optionally with a leading batch axis of 1); point perturbation.path at one"
        )
    layout = layout or _inferred_layout(tuple(v.shape), source)
    return (v.permute(2, 0, 1) if layout == "hwc" else v), layout


def _inferred_layout(dims: Tuple[int, ...], source: str) -> str:
    """ "hwc" or "chw" for 3-D ``dims``, told by which end axis has length 1 or 3; else refused."""
    first, last = dims[0] in (1, 3), dims[-1] in (1, 3)
    if last and not first:
        return "hwc"
    if first and not last:
        return "chw"
    raise ConfigError(
        f"the axis order of {source} (shape {_shape(dims)}) cannot be told; set perturbation.layout=hwc|chw"
    )


def _scale_of(v: Tensor, scale: Optional[float]) -> float:
    """The given scale, or 255 when some |value| exceeds 1 and 1 otherwise."""
    if scale is not None:
        return float(scale)
    return PIXEL_SCALE if v.numel() and float(v.abs().max()) > 1 else 1.0


def _pickled(path: Path, err: BaseException) -> bool:
    """Whether numpy refused ``path`` for holding pickled objects (rather than for being damaged)."""
    text = str(err)
    if "Object arrays" in text:
        return True
    if "pickle" not in text:
        return False
    with open(path, "rb") as f:
        return f.read(1) == _PICKLE_START


def _untrusted(path: Path, names: Sequence[str] = ()) -> UntrustedFileError:
    """The error for a file holding pickled objects (``names``: the globals it refers to, when known)."""
    named = f" ({', '.join(names[:5])})" if names else ""
    return UntrustedFileError(
        f"perturbation file {path} holds pickled Python objects{named}, which could run code when loaded, so it is "
        "refused as untrusted; save the perturbation as a plain numeric array (e.g. np.save(PATH, "
        "v.astype(np.float32)) or torch.save(v, PATH) of the tensor alone)"
    )


def _damaged(path: Path, err: BaseException) -> DamagedFileError:
    """The error for an unreadable file, with the reader's first sentence unless it speaks of pickling."""
    detail = tensors_only.reason(err)
    if any(word in detail for word in ("weights_only", "pickle")):
        detail = "not a readable array"
    return DamagedFileError(
        f"cannot read perturbation file {path}: it is truncated, damaged or not a {path.suffix} file "
        f"({type(err).__name__}: {detail}); point perturbation.path at an intact file"
    )


def _shape(dims: Any) -> str:
    """``dims`` written as "3×224×224"."""
    return "×".join(str(int(n)) for n in dims)
