"""Reading and writing universal perturbations in the formats others publish (perturbation_io)."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from uap_lightning.errors import ConfigError, DamagedFileError, NotFoundError, UntrustedFileError
from uap_lightning.perturbation_io import read_perturbation, read_perturbation_source, write_perturbation_npy

C, H, W = 3, 8, 6


@pytest.fixture
def v() -> torch.Tensor:
    """A C×H×W [0,1]-scale perturbation with ℓ∞ norm 10/255, as an attack would make."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(C, H, W, generator=g) * 2 - 1) * (10 / 255)


def hwc255(v: torch.Tensor) -> np.ndarray:
    """``v`` as authors publish it: H×W×C float32 in 0–255 pixel units."""
    return (v.permute(1, 2, 0) * 255).numpy().astype(np.float32)


def assert_same(read: torch.Tensor, v: torch.Tensor) -> None:
    assert read.dtype == torch.float32 and read.shape == v.shape
    assert torch.allclose(read, v, atol=1e-6)


def test_npy_hwc_255_round_trips(tmp_path: Path, v: torch.Tensor) -> None:
    """An H×W×C .npy in 0–255 units is read back as the C×H×W [0,1] tensor."""
    np.save(tmp_path / "v.npy", hwc255(v))
    assert_same(read_perturbation(tmp_path / "v.npy", shape=(C, H, W)), v)


def test_npy_chw_unit_scale_round_trips(tmp_path: Path, v: torch.Tensor) -> None:
    """A C×H×W .npy already in [0,1] scale is read unchanged."""
    np.save(tmp_path / "v.npy", v.numpy())
    assert_same(read_perturbation(tmp_path / "v.npy"), v)


def test_npz_round_trips_with_default_and_named_key(tmp_path: Path, v: torch.Tensor) -> None:
    """A .npz gives its only array by default, and the array `key` names among several."""
    np.savez(tmp_path / "one.npz", hwc255(v))
    np.savez(tmp_path / "two.npz", uap=hwc255(v), other=np.zeros(3))
    assert_same(read_perturbation(tmp_path / "one.npz"), v)
    assert_same(read_perturbation(tmp_path / "two.npz", key="uap"), v)


def test_mat_hwc_round_trips_with_key(tmp_path: Path, v: torch.Tensor) -> None:
    """A MATLAB H×W×C variable in 0–255 units is read by its name."""
    scipy.io.savemat(tmp_path / "v.mat", {"v": hwc255(v).astype(np.float64), "note": np.ones((1, 1))})
    assert_same(read_perturbation(tmp_path / "v.mat", key="v"), v)


def test_pt_chw_round_trips(tmp_path: Path, v: torch.Tensor) -> None:
    """A .pt holding the C×H×W tensor itself is read unchanged."""
    torch.save(v, tmp_path / "v.pt")
    assert_same(read_perturbation(tmp_path / "v.pt"), v)


def test_pth_dict_round_trips(tmp_path: Path, v: torch.Tensor) -> None:
    """A .pth dict gives its only tensor by default, or the one under `key`."""
    torch.save({"perturbation": v, "eps": 10}, tmp_path / "one.pth")
    torch.save({"perturbation": v, "other": torch.zeros(2)}, tmp_path / "two.pth")
    assert_same(read_perturbation(tmp_path / "one.pth"), v)
    assert_same(read_perturbation(tmp_path / "two.pth", key="perturbation"), v)


def test_write_then_read_returns_same_tensor(tmp_path: Path, v: torch.Tensor) -> None:
    """write_perturbation_npy stores H×W×C float32 0–255 units that read back as the same tensor."""
    path = tmp_path / "out" / "v.npy"
    write_perturbation_npy(path, v)
    stored = np.load(path)
    assert stored.dtype == np.float32 and stored.shape == (H, W, C)
    assert np.allclose(stored, hwc255(v), atol=1e-4)
    assert_same(read_perturbation(path), v)
    assert [p.name for p in path.parent.iterdir()] == ["v.npy"]  # no temporary file left behind


def test_batch_axis_of_one_is_dropped(tmp_path: Path, v: torch.Tensor) -> None:
    """A 1×H×W×C array is read as the C×H×W perturbation."""
    np.save(tmp_path / "v.npy", hwc255(v)[None])
    assert_same(read_perturbation(tmp_path / "v.npy"), v)


def test_two_dims_are_one_grey_channel(tmp_path: Path) -> None:
    """An H×W array is read as 1×H×W."""
    grey = np.full((H, W), 5.0, dtype=np.float32)
    np.save(tmp_path / "v.npy", grey)
    read = read_perturbation(tmp_path / "v.npy", shape=(1, H, W))
    assert torch.allclose(read, torch.full((1, H, W), 5 / 255))


def test_ambiguous_layout_is_refused(tmp_path: Path) -> None:
    """A 3×3×3 array is refused with the setting that resolves it."""
    np.save(tmp_path / "v.npy", np.ones((3, 3, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"perturbation\.layout=hwc\|chw"):
        read_perturbation(tmp_path / "v.npy")


def test_explicit_layout_overrides_inference(tmp_path: Path) -> None:
    """layout="hwc" and "chw" read the same 3×3×3 array with different axis orders."""
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    np.save(tmp_path / "v.npy", a)
    hwc = read_perturbation(tmp_path / "v.npy", layout="hwc", scale=255)
    chw = read_perturbation(tmp_path / "v.npy", layout="chw", scale=255)
    assert torch.equal(hwc, torch.from_numpy(a).permute(2, 0, 1) / 255)
    assert torch.equal(chw, torch.from_numpy(a) / 255)


def test_scale_is_inferred_both_ways(tmp_path: Path) -> None:
    """Values beyond ±1 are read as 0–255 units, values within ±1 as [0,1] scale."""
    np.save(tmp_path / "big.npy", np.full((H, W, C), -10.0, dtype=np.float32))
    np.save(tmp_path / "small.npy", np.full((H, W, C), 0.04, dtype=np.float32))
    assert torch.allclose(read_perturbation(tmp_path / "big.npy"), torch.full((C, H, W), -10 / 255))
    assert torch.allclose(read_perturbation(tmp_path / "small.npy"), torch.full((C, H, W), 0.04))


def test_explicit_scale_overrides_inference(tmp_path: Path) -> None:
    """scale=255 divides small values by 255; scale=1 keeps values within ±1."""
    np.save(tmp_path / "small.npy", np.full((H, W, C), 0.5, dtype=np.float32))
    assert torch.allclose(read_perturbation(tmp_path / "small.npy", scale=255), torch.full((C, H, W), 0.5 / 255))
    assert torch.allclose(read_perturbation(tmp_path / "small.npy", scale=1), torch.full((C, H, W), 0.5))


def test_integer_array_is_read_as_float32(tmp_path: Path) -> None:
    """An int8 H×W×C array in 0–255 units is read as float32 [0,1] scale."""
    np.save(tmp_path / "v.npy", np.full((H, W, C), -10, dtype=np.int8))
    read = read_perturbation(tmp_path / "v.npy")
    assert read.dtype == torch.float32 and torch.allclose(read, torch.full((C, H, W), -10 / 255))


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    """A .npy holding an object array is refused with one message that suggests no unsafe loading."""
    np.save(tmp_path / "v.npy", np.array([{"v": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UntrustedFileError) as info:
        read_perturbation(tmp_path / "v.npy")
    message = str(info.value)
    assert "v.npy" in message and "pickled" in message and "\n" not in message
    assert "allow_pickle=True" not in message and "weights_only" not in message


def test_pickled_pt_is_refused(tmp_path: Path) -> None:
    """A .pt holding non-tensor Python objects is refused without suggesting weights_only=False."""
    torch.save({"v": np.zeros((3, 2, 2))}, tmp_path / "v.pt")
    with pytest.raises(UntrustedFileError) as info:
        read_perturbation(tmp_path / "v.pt")
    assert "weights_only" not in str(info.value)


def test_mat_wrong_key_lists_available_keys(tmp_path: Path, v: torch.Tensor) -> None:
    """A .mat without the requested key is refused with the names it does have."""
    scipy.io.savemat(tmp_path / "v.mat", {"uap": hwc255(v), "mask": np.ones((2, 2))})
    with pytest.raises(ConfigError, match=r"'nope'.*mask, uap.*perturbation\.key"):
        read_perturbation(tmp_path / "v.mat", key="nope")


def test_mat_several_variables_need_key(tmp_path: Path, v: torch.Tensor) -> None:
    """A .mat with several variables and no key is refused, naming them and perturbation.key=NAME."""
    scipy.io.savemat(tmp_path / "v.mat", {"uap": hwc255(v), "mask": np.ones((2, 2))})
    with pytest.raises(ConfigError, match=r"mask, uap.*perturbation\.key=NAME"):
        read_perturbation(tmp_path / "v.mat")


def test_shape_mismatch_names_both_shapes(tmp_path: Path, v: torch.Tensor) -> None:
    """A perturbation of another size is refused, naming the file, both shapes and the layout used."""
    np.save(tmp_path / "v.npy", hwc255(v))
    with pytest.raises(ConfigError) as info:
        read_perturbation(tmp_path / "v.npy", shape=(3, 224, 224))
    message = str(info.value)
    for part in ("v.npy", f"{H}×{W}×{C}", f"{C}×{H}×{W}", "3×224×224", "layout=hwc"):
        assert part in message


def test_nan_is_refused(tmp_path: Path, v: torch.Tensor) -> None:
    """A perturbation holding NaN is refused as damaged."""
    a = hwc255(v)
    a[0, 0, 0] = np.nan
    np.save(tmp_path / "v.npy", a)
    with pytest.raises(DamagedFileError, match="NaN"):
        read_perturbation(tmp_path / "v.npy")


def test_non_numeric_dtype_is_refused(tmp_path: Path) -> None:
    """A boolean array is refused as not holding real numbers."""
    np.save(tmp_path / "v.npy", np.ones((H, W, C), dtype=bool))
    with pytest.raises(DamagedFileError, match="not real numbers"):
        read_perturbation(tmp_path / "v.npy")


@pytest.mark.parametrize("name", ["v.npy", "v.pt", "v.mat"])
def test_truncated_file_is_refused(tmp_path: Path, v: torch.Tensor, name: str) -> None:
    """A file cut in half is refused as damaged, with a one-line message."""
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, hwc255(v))
    elif name.endswith(".pt"):
        torch.save(v, path)
    else:
        scipy.io.savemat(path, {"v": hwc255(v)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DamagedFileError) as info:
        read_perturbation(path)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert "weights_only" not in str(info.value) and "pickle" not in str(info.value)


def test_foreign_file_is_damaged_not_untrusted(tmp_path: Path) -> None:
    """A text file named .npy is refused as damaged, not as pickled."""
    (tmp_path / "v.npy").write_text("not an array")
    with pytest.raises(DamagedFileError, match="v.npy"):
        read_perturbation(tmp_path / "v.npy")


def test_key_does_not_apply_to_single_array_files(tmp_path: Path, v: torch.Tensor) -> None:
    """perturbation.key (for named arrays) leaves a .npy and a bare tensor file readable."""
    np.save(tmp_path / "v.npy", hwc255(v))
    torch.save(v, tmp_path / "v.pt")
    assert torch.allclose(read_perturbation(tmp_path / "v.npy", key="uap"), v, atol=1e-6)
    assert torch.equal(read_perturbation(tmp_path / "v.pt", key="uap"), v)


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    """A .png is refused with the list of supported suffixes."""
    (tmp_path / "v.png").write_bytes(b"png")
    with pytest.raises(ConfigError, match=r"\.npy, \.npz, \.mat, \.pt, \.pth"):
        read_perturbation(tmp_path / "v.png")


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    """A path that does not exist raises NotFoundError naming it."""
    with pytest.raises(NotFoundError, match="absent.npy"):
        read_perturbation(tmp_path / "absent.npy")


@pytest.mark.parametrize("setting", [{"layout": "whc"}, {"scale": 100}])
def test_bad_settings_are_refused(tmp_path: Path, v: torch.Tensor, setting: dict) -> None:
    """An unknown layout or scale is refused as a setting error."""
    np.save(tmp_path / "v.npy", hwc255(v))
    with pytest.raises(ConfigError, match="perturbation\\." + next(iter(setting))):
        read_perturbation(tmp_path / "v.npy", **setting)


class Settings:
    """A class of the test module: pickled by reference, so loading it would import and build it."""


@pytest.mark.parametrize(
    "save, wanted",
    [
        (lambda path: torch.save({"v": torch.zeros(C, H, W), "meta": Settings()}, path), "Settings"),
        (lambda path: torch.save({"v": np.zeros((H, W, C), np.float32)}, path), "numpy"),
        (
            lambda path: torch.save(
                {"v": torch.zeros(C, H, W), "meta": Settings()}, path, _use_new_zipfile_serialization=False
            ),
            "Settings",
        ),
        (lambda path: path.write_bytes(pickle.dumps({"v": Settings()})), "Settings"),
    ],
    ids=["zip-class", "zip-numpy", "legacy-class", "raw-pickle"],
)
def test_pt_with_a_pickled_global_names_it(tmp_path: Path, save, wanted: str) -> None:
    """A .pt whose pickle refers to a Python global is refused as untrusted, naming the global; no warning
    is printed beside the message."""
    path = tmp_path / "v.pt"
    save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UntrustedFileError) as info:
            read_perturbation(path)
    message = str(info.value)
    assert wanted in message and "refused" in message and "v.pt" in message
    assert "weights_only" not in message and "\n" not in message


def npy_header_only(path: Path, shape: tuple, tail: bytes = b"\0" * 64) -> Path:
    """A .npy whose header claims float32 ``shape`` but whose data is only ``tail``."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(tail)
    return path


def test_npy_header_claiming_more_data_than_the_file_holds_is_refused_before_reading(
    tmp_path: Path, monkeypatch
) -> None:
    """A .npy header claiming 20000×20000×3 float32 (4.8 GB) in a file of a few bytes is refused
    from its header, naming the shape and both sizes; the data is never read."""
    path = npy_header_only(tmp_path / "v.npy", (20000, 20000, 3))
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("the array was read"))
    with pytest.raises(DamagedFileError) as info:
        read_perturbation(path)
    message = str(info.value)
    assert "v.npy" in message and "20000×20000×3" in message
    assert "4800000000 bytes" in message and f"{path.stat().st_size} bytes" in message


def test_npz_member_claiming_more_data_than_it_holds_is_refused(tmp_path: Path) -> None:
    """The same check for an array in a .npz archive."""
    member = npy_header_only(tmp_path / "uap.npy", (20000, 20000, 3))
    with zipfile.ZipFile(tmp_path / "v.npz", "w") as archive:
        archive.write(member, "uap.npy")
    with pytest.raises(DamagedFileError, match=r"v\.npz\[uap\].*20000×20000×3"):
        read_perturbation(tmp_path / "v.npz")


@pytest.mark.parametrize(
    "value, scale, message",
    [
        (300.0, None, r"0–255 pixel units.*300"),
        (-1000.0, 255, r"0–255 pixel units.*1000"),
        (10.0, 1, r"perturbation\.scale=1.*\[0,1\] scale.*10"),
    ],
)
def test_values_beyond_255_pixel_units_are_refused(tmp_path: Path, value: float, scale, message: str) -> None:
    """|v| beyond 255 in 0–255 units (or beyond 1 in [0,1] scale) cannot be a perturbation of an
    image: refused, naming the units the file was read in and its largest |value|."""
    a = np.zeros((H, W, C), dtype=np.float32)
    a[1, 2, 0] = value
    np.save(tmp_path / "v.npy", a)
    with pytest.raises(ConfigError, match=message):
        read_perturbation(tmp_path / "v.npy", scale=scale)


def test_a_run_folder_perturbation_is_read_as_the_attack_made_it(tmp_path: Path) -> None:
    """The perturbation.pt of a run folder is in [0,1] scale by the project's own convention: an ℓ2
    perturbation with entries beyond ±1 (void once x+v is clipped) is read unchanged."""
    v = torch.zeros(C, H, W)
    v[0, 0, 0] = 1.5
    torch.save(v, tmp_path / "perturbation.pt")
    assert torch.equal(read_perturbation_source(tmp_path), v)


def test_an_archive_of_another_size_is_refused_before_it_is_decompressed(tmp_path, monkeypatch):
    import numpy as np

    from uap_lightning.errors import ConfigError
    from uap_lightning.perturbation_io import read_perturbation_source

    path = tmp_path / "big.npz"
    np.savez_compressed(path, v=np.zeros((2000, 2000), dtype=np.float32))  # 16 MB of zeros in a few KB

    def never(self, key):
        raise AssertionError("the array was decompressed")

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", never)
    with pytest.raises(ConfigError, match=r"shape 2000×2000 \(4000000 values\), but a perturbation of 192 values"):
        read_perturbation_source(path, shape=(3, 8, 8), layout=None, scale=None, key=None)
