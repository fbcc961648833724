"""read_image: every format ends as float32 in [0, 1] with bone white, or a DataError naming the file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from g2d.data.images import read_image, to_uint8
from g2d.errors import DataError
from tests.layouts import write_dicom


def _gradient(rows: int = 6, cols: int = 8, lo: int = 100, hi: int = 4000) -> np.ndarray:
    return np.linspace(lo, hi, rows * cols).round().astype(np.uint16).reshape(rows, cols)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR), scaled to [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_monochrome2_is_min_max_scaled_at_native_shape(tmp_path: Path) -> None:
    arr = _gradient()
    image = read_image(write_dicom(tmp_path / "m2.dcm", arr))
    assert image.dtype == np.float32 and image.shape == arr.shape
    np.testing.assert_allclose(image, (arr - arr.min()) / (arr.max() - arr.min()), atol=1e-6)
    assert image.min() == 0.0 and image.max() == 1.0


def test_monochrome1_is_inverted_so_bone_is_white(tmp_path: Path) -> None:
    arr = _gradient()
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", arr))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_window_clips_outside_and_is_linear_inside(tmp_path: Path) -> None:
    arr = _gradient(lo=0, hi=4095)
    image = read_image(write_dicom(tmp_path / "w.dcm", arr, WindowCenter=2048, WindowWidth=1025))
    np.testing.assert_allclose(image, _linear_window(arr.astype(float), 2048, 1025), atol=1e-6)
    flat, values = image.ravel(), arr.ravel()
    assert (flat[values <= 1535] == 0).all() and (flat[values >= 2560] == 1).all()
    assert (np.diff(flat) >= 0).all()  # the gradient rises, so must its windowed image
    inside = flat[(values > 1535) & (values < 2560)]
    assert inside.size > 1 and (np.diff(inside) > 0).all() and 0 < inside.min() and inside.max() < 1
    # hand-computed: c' = 2047.5, w' = 1024, so y = (x - 2047.5) / 1024 + 0.5
    few = np.array([[1536, 2048, 2559]], dtype=np.uint16)
    got = read_image(write_dicom(tmp_path / "few.dcm", few, WindowCenter=2048, WindowWidth=1025))
    np.testing.assert_allclose(got[0], [0.5 / 1024, 512.5 / 1024, 1023.5 / 1024], atol=1e-6)


def test_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    arr = _gradient(lo=0, hi=1500)
    path = write_dicom(tmp_path / "r.dcm", arr, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000,
                       WindowWidth=2001)
    image = read_image(path)
    np.testing.assert_allclose(image, _linear_window(2.0 * arr - 1000, 1000, 2001), atol=1e-6)
    assert image.ravel()[0] == 0.0  # stored 0 -> -1000, below the window; it would sit inside without rescale
    assert not np.allclose(image, _linear_window(arr.astype(float), 1000, 2001))


def test_voi_lut_sequence_is_preferred_and_scaled_by_its_range(tmp_path: Path) -> None:
    lut = np.linspace(4095, 0, 256).round().astype("<u2")  # an inverting 12-bit LUT over stored 0..255
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.LUTData = lut.tobytes()
    arr = np.arange(0, 300, 10, dtype=np.uint16).reshape(5, 6)
    path = write_dicom(tmp_path / "lut.dcm", arr, VOILUTSequence=Sequence([item]), WindowCenter=100, WindowWidth=50)
    np.testing.assert_allclose(read_image(path), lut[np.minimum(arr, 255)] / 4095, atol=1e-6)


def test_signed_and_preambleless_dicoms_and_multiframe_refused(tmp_path: Path) -> None:
    signed = np.arange(-1000, 1000, 50, dtype=np.int16).reshape(5, 8)
    np.testing.assert_allclose(read_image(write_dicom(tmp_path / "s.dcm", signed)), (signed + 1000) / 1950, atol=1e-6)

    frames = np.stack([_gradient(), _gradient()[::-1]])
    with pytest.raises(DataError, match=r"mf\.dcm holds 2 frames; a radiograph is one frame"):
        read_image(write_dicom(tmp_path / "mf.dcm", frames))  # which frame is meant is not g2d's guess to make

    bare = write_dicom(tmp_path / "bare.dcm", _gradient(), preamble=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(bare), read_image(write_dicom(tmp_path / "full.dcm", _gradient())), atol=1e-6)


def test_constant_dicom_is_zeros(tmp_path: Path) -> None:
    image = read_image(write_dicom(tmp_path / "c.dcm", np.full((4, 4), 700, dtype=np.uint16)))
    assert image.shape == (4, 4) and not image.any()


def test_png_and_jpg_read_to_unit_range(tmp_path: Path) -> None:
    ramp8 = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (3, 1))
    Image.fromarray(ramp8).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), ramp8 / 255, atol=1e-6)

    ramp16 = np.tile(np.linspace(0, 65535, 40).round().astype(np.uint16), (2, 1))
    png16 = Image.fromarray(ramp16)
    assert png16.mode == "I;16"
    png16.save(tmp_path / "b.png")
    image16 = read_image(tmp_path / "b.png")
    assert image16.dtype == np.float32 and image16.shape == (2, 40)
    np.testing.assert_allclose(image16, ramp16 / 65535, atol=1e-6)

    smooth = np.tile(np.linspace(20, 230, 64).round().astype(np.uint8), (48, 1))
    Image.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)
    jpg = read_image(tmp_path / "c.jpg")
    assert jpg.shape == (48, 64) and 0 <= jpg.min() and jpg.max() <= 1
    np.testing.assert_allclose(jpg, smooth / 255, atol=0.03)  # lossy, but close

    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[0, :, 1], rgb[1, :, 2] = 200, 100, 50
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "d.png")
    gray = read_image(tmp_path / "d.png")
    assert gray.shape == (2, 3)
    np.testing.assert_allclose(gray, np.asarray(Image.fromarray(rgb).convert("L")) / 255, atol=1e-6)
    assert gray[0, 0] == pytest.approx(round(0.299 * 200 + 0.587 * 100) / 255, abs=1e-6)


def test_to_uint8_round_trips_8bit_values() -> None:
    values = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(values / 255.0), values)
    np.testing.assert_array_equal(to_uint8(np.array([-0.5, 1.5])), [0, 255])


def test_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.dcm"
    with pytest.raises(DataError, match=re.escape(missing.name) + ".*does not exist"):
        read_image(missing)

    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(empty.name) + ".*empty"):
        read_image(empty)

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image\x00\x01\x02" * 10)
    with pytest.raises(DataError, match=re.escape(garbage.name) + ".*DICOM, PNG or JPG"):
        read_image(garbage)

    no_pixels = write_dicom(tmp_path / "nopixels.dcm", _gradient())
    ds = dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels, enforce_file_format=True)
    with pytest.raises(DataError, match=re.escape(no_pixels.name) + ".*no pixel data"):
        read_image(no_pixels)

    bad_window = write_dicom(tmp_path / "badwindow.dcm", _gradient(), WindowCenter=100, WindowWidth=0)
    with pytest.raises(DataError, match=re.escape(bad_window.name) + ".*window"):
        read_image(bad_window)
