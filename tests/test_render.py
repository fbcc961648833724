"""SynthCXR renderer and lung-field loader: determinism, placement conventions, region handling."""

from __future__ import annotations

import importlib.util
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2d.data.sources.lungs import MASK_FOLDER, LungFieldSet, load_lung_fields, split_sides
from g2d.data.synthcxr.render import KINDS, FindingSpec, Radiograph, render_radiograph
from g2d.errors import DataError

N = 64


def _ellipse_lungs(n: int = N) -> np.ndarray:
    """Two upright ellipses placed like PA lung fields (image left = patient's right)."""
    yy, xx = np.mgrid[0:n, 0:n]
    right = ((xx - 0.31 * n) / (0.17 * n)) ** 2 + ((yy - 0.46 * n) / (0.34 * n)) ** 2 <= 1.0
    left = ((xx - 0.69 * n) / (0.17 * n)) ** 2 + ((yy - 0.46 * n) / (0.34 * n)) ** 2 <= 1.0
    return right | left


LUNGS = _ellipse_lungs()


def _render(findings, seed=0, lungs=LUNGS) -> Radiograph:
    return render_radiograph(lungs, findings, np.random.default_rng(seed))


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(ys.mean()), float(xs.mean())


# ------------------------------------------------------------------------------------------- renderer


def test_output_types_and_shapes():
    spec = [FindingSpec("opacity", "left", "lower", 0.66), FindingSpec("nodule", "right", "upper", 0.33)]
    r = _render(spec)
    assert r.image.dtype == np.uint8 and r.image.shape == (N, N)
    assert r.body.dtype == bool and r.body.shape == (N, N)
    assert len(r.masks) == 2
    for m in r.masks:
        assert m.dtype == bool and m.shape == (N, N)


def test_same_seed_same_bytes_and_different_seed_differs():
    spec = [FindingSpec("consolidation", "right", "middle", 1.0), FindingSpec("device", "left", "upper", 0.5)]
    a, b, c = _render(spec, 7), _render(spec, 7), _render(spec, 8)
    assert a.image.tobytes() == b.image.tobytes()
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    assert a.image.tobytes() != c.image.tobytes()


def test_anatomy_is_shared_with_and_without_a_finding():
    """The anatomy (and grain) draw first, so adding a nodule on the right changes nothing on the left."""
    plain = _render([], 3).image
    with_nodule = _render([FindingSpec("nodule", "right", "middle", 0.66)], 3)
    assert _centroid(with_nodule.masks[0])[1] < N / 2 - 4
    assert np.array_equal(plain[:, N // 2 :], with_nodule.image[:, N // 2 :])
    assert not np.array_equal(plain, with_nodule.image)


def test_bones_and_mediastinum_bright_lungs_dark():
    r = _render([], 1)
    img = r.image.astype(float)
    lungs = LUNGS & ~np.pad(np.zeros((N - 8, N - 8), bool), 4, constant_values=True)
    centre = np.zeros_like(LUNGS)
    centre[N // 8 : N // 2, N // 2 - 2 : N // 2 + 2] = True
    below = np.zeros_like(LUNGS)
    below[int(0.9 * N) :, N // 4 : 3 * N // 4] = True
    assert img[centre].mean() > img[lungs].mean() + 40
    assert img[below].mean() > img[lungs].mean() + 40
    assert img[~r.body].mean() < img[lungs].mean()  # air outside the patient is darkest


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gives_a_nonempty_mask(kind):
    r = _render([FindingSpec(kind, "left", "middle", 0.66)], seed=11)
    assert r.masks[0].any(), kind


@pytest.mark.parametrize(
    "kind",
    [
        "opacity",
        "consolidation",
        "atelectasis",
        "effusion",
        "nodule",
        "granuloma",
        "pneumothorax",
        "emphysema",
        "edema",
        "device",
        "scar",
    ],
)
def test_side_convention_patient_left_is_image_right(kind):
    for seed in range(3):
        left = _render([FindingSpec(kind, "left", "middle", 0.66)], seed).masks[0]
        right = _render([FindingSpec(kind, "right", "middle", 0.66)], seed).masks[0]
        assert _centroid(left)[1] > N / 2, (kind, seed)
        assert _centroid(right)[1] < N / 2, (kind, seed)


def test_bilateral_covers_both_sides():
    m = _render([FindingSpec("opacity", "bilateral", "diffuse", 0.66)], 2).masks[0]
    assert m[:, : N // 2].any() and m[:, N // 2 :].any()


@pytest.mark.parametrize(
    "kind", ["opacity", "consolidation", "nodule", "granuloma", "scar", "atelectasis", "emphysema", "edema"]
)
def test_zone_convention_upper_above_lower(kind):
    for seed in range(2):
        up = _render([FindingSpec(kind, "right", "upper", 0.66)], seed).masks[0]
        low = _render([FindingSpec(kind, "right", "lower", 0.66)], seed).masks[0]
        assert _centroid(up)[0] < _centroid(low)[0], (kind, seed)


def test_effusion_grows_with_severity_and_cardiomegaly_enlarges_heart():
    small = _render([FindingSpec("effusion", "right", "lower", 0.33)], 4).masks[0].sum()
    large = _render([FindingSpec("effusion", "right", "lower", 1.0)], 4).masks[0].sum()
    assert large > small
    heart = _render([FindingSpec("cardiomegaly", "bilateral", "diffuse", 1.0)], 4).masks[0]
    cols = np.nonzero(heart.any(axis=0))[0]
    lung_cols = np.nonzero(LUNGS.any(axis=0))[0]
    ctr = (cols[-1] - cols[0] + 1) / (lung_cols[-1] - lung_cols[0] + 1)
    assert 0.55 <= ctr <= 0.72
    assert _centroid(heart)[1] > N / 2  # the heart's bulk projects to the image right


@pytest.mark.parametrize("kind", ["pneumothorax", "opacity", "consolidation", "nodule", "effusion", "scar"])
def test_region_is_respected(kind):
    region = np.zeros((N, N), bool)
    region[10:30, 36:56] = True  # upper part of the patient's left lung
    r = _render([FindingSpec(kind, "right", "lower", 0.66, region=region)], 5)
    mask = r.masks[0]
    assert mask.any()
    assert not (mask & ~region).any()


def test_region_outside_lungs_gives_empty_mask_without_raising():
    region = np.zeros((N, N), bool)
    region[:4, :4] = True
    specs = [FindingSpec(k, "left", "upper", 0.5, region=region) for k in ("opacity", "pneumothorax", "nodule")]
    r = _render(specs + [FindingSpec("nodule", "left", "upper", 0.5)], 6)
    assert [m.any() for m in r.masks] == [False, False, False, True]


def test_bad_spec_and_bad_region_shape_are_rejected():
    with pytest.raises(ValueError):
        FindingSpec("tumour", "left", "upper", 0.5)
    with pytest.raises(ValueError):
        FindingSpec("nodule", "middle", "upper", 0.5)
    with pytest.raises(ValueError):
        FindingSpec("nodule", "left", "upper", 0.0)
    with pytest.raises(ValueError):
        _render([FindingSpec("nodule", "left", "upper", 0.5, region=np.ones((8, 8), bool))])


@pytest.mark.parametrize("n", [32, 100])
def test_other_sizes_render(n):
    r = _render([FindingSpec(k, "bilateral", "diffuse", 1.0) for k in KINDS], 9, lungs=_ellipse_lungs(n))
    assert r.image.shape == (n, n)
    assert all(m.any() for m in r.masks)


# ------------------------------------------------------------------------------------------- lung fields


def _png(mask: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format=fmt)
    return buf.getvalue()


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_split_sides_right_lung_is_image_left():
    right, left = split_sides(LUNGS)
    assert _centroid(right)[1] < N / 2 < _centroid(left)[1]
    assert not (right & left).any() and np.array_equal(right | left, LUNGS)


def test_load_lung_fields_keeps_good_and_counts_dropped(tmp_path):
    good = _ellipse_lungs(120)
    one_blob = np.zeros((120, 120), bool)
    one_blob[20:100, 20:100] = True
    lopsided = _ellipse_lungs(120)
    lopsided[:, 60:] = False
    yy, xx = np.mgrid[0:120, 0:120]
    lopsided |= ((xx - 85) / 6) ** 2 + ((yy - 55) / 20) ** 2 <= 1
    boxed = good.copy()
    boxed[40:50, 30:40] = False  # an annotation box drawn inside a lung: holes are filled
    boxed[42:48, 32:38] = True
    zpath = _write_zip(
        tmp_path / "masks.zip",
        {
            MASK_FOLDER: b"",
            MASK_FOLDER + "b_good.png": _png(good),
            MASK_FOLDER + "a_good.JPG": _png(good, "JPEG"),
            MASK_FOLDER + "c_boxed.png": _png(boxed),
            MASK_FOLDER + "d_empty.png": _png(np.zeros((50, 60), bool)),
            MASK_FOLDER + "e_one.png": _png(one_blob),
            MASK_FOLDER + "f_lopsided.png": _png(lopsided),
            MASK_FOLDER + "g_broken.png": b"not an image",
            MASK_FOLDER + "notes.txt": b"ignored",
        },
    )
    result = load_lung_fields(zpath, 48)
    assert isinstance(result, LungFieldSet)
    assert [f.name for f in result.fields] == ["a_good.JPG", "b_good.png", "c_boxed.png"]
    assert result.dropped == {"area_ratio": 1, "empty": 1, "not_two_lungs": 1, "unreadable": 1}
    for f in result.fields:
        assert f.mask.dtype == bool and f.mask.shape == (48, 48)
        right, left = split_sides(f.mask)
        assert right.any() and left.any()
        rows = np.nonzero(f.mask.any(axis=1))[0]
        cols = np.nonzero(f.mask.any(axis=0))[0]
        assert 0.06 <= rows[0] / 48 <= 0.14 and 0.72 <= rows[-1] / 48 <= 0.88
        assert 0.66 <= (cols[-1] - cols[0] + 1) / 48 <= 0.84


def test_load_lung_fields_missing_or_bad_zip_names_the_path(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(DataError, match="nope.zip"):
        load_lung_fields(missing, 64)
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"definitely not a zip")
    with pytest.raises(DataError, match="bogus.zip"):
        load_lung_fields(bogus, 64)


def _real_zip() -> Path | None:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None
    path = Path(os.path.dirname(spec.origin)) / "data" / "semantic_masks_v7labs_lungs.zip"
    return path if path.is_file() else None


def test_real_lung_masks_load_and_render(tmp_path):
    """A sorted slice of the shipped archive (the full load takes seconds) through loader and renderer."""
    real = _real_zip()
    if real is None:
        pytest.skip("torchxrayvision's lung mask archive is not installed")
    with zipfile.ZipFile(real) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(MASK_FOLDER) and not n.endswith("/"))[:24]
        subset = _write_zip(tmp_path / "subset.zip", {n: zf.read(n) for n in names})
    result = load_lung_fields(subset, 64)
    assert len(result.fields) + result.n_dropped == len(names)
    assert len(result.fields) >= 12
    r = render_radiograph(
        result.fields[0].mask, [FindingSpec("effusion", "left", "lower", 0.66)], np.random.default_rng(0)
    )
    assert r.masks[0].any() and _centroid(r.masks[0])[1] > 32
