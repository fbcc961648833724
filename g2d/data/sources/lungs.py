"""Real lung-field outlines for SynthCXR.

The renderer draws every anatomical structure relative to a lung mask, so using real, varied lung
outlines (517 hand-drawn masks shipped with torchxrayvision) is what keeps synthetic films from all
sharing one silhouette. The zip path is an argument so this module stays free of the torch import.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from g2d.errors import DataError

__all__ = ["LungField", "LungFieldSet", "load_lung_fields", "split_sides", "MASK_FOLDER"]

MASK_FOLDER = "semantic_masks_v7labs_lungs/"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Where the lung bounding box lands in the output frame, as fractions of the side. A PA film shows the
# lungs over ~70-80% of the width with apices ~10% from the top and bases ~75-85% down; keeping the aspect
# ratio inside [W_MIN, W_MAX] x [H_MIN, H_MAX] means only outlines with odd proportions get stretched.
_TOP = 0.10
_W_MIN, _W_MAX = 0.70, 0.80
_H_MIN, _H_MAX = 0.65, 0.74
_H_TARGET = 0.70

# Quality gates (on the source mask, so the kept set does not depend on the output size).
_SPECK_FRACTION = 0.01  # components smaller than this share of the foreground are annotation specks
_MIN_AREA_RATIO = 0.5  # smaller lung / larger lung
_ASPECT_RANGE = (0.6, 1.25)  # lung bounding box height / width
_MAX_OVERLAP = 0.25  # horizontal overlap of the two lungs' extents, as a share of the narrower lung
_MAX_CUT = 0.15  # longest run along a film edge, as a share of the lungs' extent along that edge
_DECODE = 768  # working resolution (longest side, at least) for the source masks


@dataclass(frozen=True)
class LungField:
    """One real lung outline, already placed as on a PA film and resized to the output size."""

    name: str
    mask: np.ndarray  # bool, size x size; image left = patient's right


@dataclass(frozen=True)
class LungFieldSet:
    """The usable outlines plus why the others were dropped, so callers can report data loss."""

    fields: list[LungField]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


def load_lung_fields(zip_path: Path, size: int) -> LungFieldSet:
    """Read every mask in the zip, keep the plausible two-lung ones and place them on a size x size frame.

    Members are visited in sorted order so the list (and any index a caller stores) is reproducible.
    """
    zip_path = Path(zip_path)
    if size < 16:
        raise ValueError(f"lung field size must be >= 16, got {size}")
    if not zip_path.is_file():
        raise DataError(
            f"lung mask archive not found: {zip_path} (install torchxrayvision==1.5.7, which ships it in its "
            "data folder)"
        )
    if not zipfile.is_zipfile(zip_path):
        raise DataError(f"lung mask archive is not a zip file: {zip_path} (reinstall torchxrayvision)")

    fields: list[LungField] = []
    dropped: Counter[str] = Counter()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = sorted(
                n for n in zf.namelist() if n.startswith(MASK_FOLDER) and n.lower().endswith(_IMAGE_SUFFIXES)
            )
            if not names:
                raise DataError(f"{zip_path} holds no mask images under {MASK_FOLDER}")
            for name in names:
                try:
                    source = _decode(zf.read(name))
                except (OSError, ValueError, zipfile.BadZipFile):
                    dropped["unreadable"] += 1
                    continue
                lungs, reason = _two_lungs(source)
                if lungs is None:
                    dropped[reason] += 1
                    continue
                fields.append(LungField(name=name[len(MASK_FOLDER) :], mask=_place(*lungs, size)))
    except zipfile.BadZipFile as exc:
        raise DataError(f"lung mask archive is corrupt: {zip_path} ({exc})") from exc
    if not fields:
        raise DataError(f"no usable lung masks in {zip_path} (dropped: {dict(dropped)})")
    return LungFieldSet(fields=fields, dropped=dict(sorted(dropped.items())))


def split_sides(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (right_lung, left_lung) in the patient's sense: right_lung is the one on the image's left.

    Uses the two largest 4-connected components; small extra pieces join the nearer lung. A mask whose
    lungs touch is cut at the emptiest column of its middle third, so callers never see a missing side.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"lung mask must be 2-D, got shape {mask.shape}")
    n_cols = mask.shape[1]
    labels, count = ndi.label(mask)
    if count >= 2:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        first, second = np.argsort(sizes, kind="stable")[::-1][:2]
        if sizes[second] >= 0.2 * sizes[first]:
            centres = ndi.center_of_mass(mask, labels, index=np.arange(1, count + 1))
            cx = np.array([c[1] for c in centres])
            a, b = (first, second) if cx[first - 1] < cx[second - 1] else (second, first)
            split = 0.5 * (cx[a - 1] + cx[b - 1])
            on_right = np.concatenate([[False], cx < split])  # label -> belongs to image-left lung
            on_right[a], on_right[b] = True, False
            right = on_right[labels] & mask
            return right, mask & ~right
    cols = np.nonzero(mask.any(axis=0))[0]
    if cols.size == 0:
        empty = np.zeros_like(mask)
        return empty, empty.copy()
    lo, hi = cols[0], cols[-1]
    third = max(1, (hi - lo) // 3)
    counts = mask[:, lo + third : hi - third + 1].sum(axis=0)
    cut = lo + third + int(np.argmin(counts)) if counts.size else (lo + hi) // 2
    right = mask.copy()
    right[:, cut:] = False
    left = mask.copy()
    left[:, : min(cut + 1, n_cols)] = False
    return right, left


def _decode(data: bytes) -> np.ndarray:
    """Decode at a modest resolution: the outlines are smooth, and full-size labelling costs seconds.

    The working resolution does not depend on the output size, so the kept set is the same at every size.
    """
    image = Image.open(io.BytesIO(data))
    image.draft("L", (_DECODE, _DECODE))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that is enough
    image = image.convert("L")
    factor = max(image.size) // _DECODE
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image) > 127  # JPEG ringing stays well below mid-grey


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background; some masks have annotation boxes drawn inside a lung."""
    background, count = ndi.label(~mask)
    keep = np.ones(count + 1, dtype=bool)
    keep[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    keep[0] = True
    return keep[background]


def _two_lungs(mask: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """Return ((right, left), "") for a plausible frontal lung pair, else (None, reason)."""
    if not mask.any():
        return None, "empty"
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # A lung grazing the film edge is common and harmless; one clipped along a long stretch renders flat.
    if (
        max(mask[0].sum(), mask[-1].sum()) > _MAX_CUT * width
        or max(mask[:, 0].sum(), mask[:, -1].sum()) > _MAX_CUT * height
    ):
        return None, "cut_off"
    mask = _fill_holes(mask)
    labels, count = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    large = np.nonzero(sizes >= _SPECK_FRACTION * sizes.sum())[0]
    if large.size != 2:
        return None, "not_two_lungs"
    a, b = labels == large[0], labels == large[1]
    small, big = sorted((sizes[large[0]], sizes[large[1]]))
    if small / big < _MIN_AREA_RATIO:
        return None, "area_ratio"
    cols_a, cols_b = np.nonzero(a.any(axis=0))[0], np.nonzero(b.any(axis=0))[0]
    if cols_a.mean() > cols_b.mean():
        a, b, cols_a, cols_b = b, a, cols_b, cols_a
    overlap = cols_a[-1] - cols_b[0] + 1
    if overlap > _MAX_OVERLAP * min(cols_a.size, cols_b.size):
        return None, "not_side_by_side"
    rows = np.nonzero((a | b).any(axis=1))[0]
    width = cols_b[-1] - cols_a[0] + 1
    aspect = (rows[-1] - rows[0] + 1) / width
    if not _ASPECT_RANGE[0] <= aspect <= _ASPECT_RANGE[1]:
        return None, "implausible_aspect"
    return (a, b), ""


def _place(right: np.ndarray, left: np.ndarray, size: int) -> np.ndarray:
    """Crop to the lungs and paste them where a PA film would show them.

    Each lung is resized on its own and the left one is kept one pixel clear of the right one, so the
    two stay separate components even at 32 px and `split_sides` can rely on labelling.
    """
    both = right | left
    rows = np.nonzero(both.any(axis=1))[0]
    cols = np.nonzero(both.any(axis=0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    aspect = (r1 - r0) / (c1 - c0)
    w_frac = float(np.clip(_H_TARGET / aspect, _W_MIN, _W_MAX))
    h_frac = float(np.clip(aspect * w_frac, _H_MIN, _H_MAX))
    tw = max(4, int(round(w_frac * size)))
    th = max(4, int(round(h_frac * size)))
    x0 = (size - tw) // 2
    y0 = int(round(_TOP * size))
    # BOX averages when shrinking; BILINEAR keeps edges smooth when a small source is enlarged.
    shrinking = tw <= c1 - c0
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    out = []
    for lung in (right, left):
        crop = Image.fromarray(lung[r0:r1, c0:c1].astype(np.uint8) * 255)
        small = np.asarray(crop.resize((tw, th), resample)) >= 128
        canvas = np.zeros((size, size), dtype=bool)
        canvas[y0 : y0 + th, x0 : x0 + tw] = small
        out.append(canvas)
    r, lft = out
    lft &= ~ndi.binary_dilation(r)
    return r | lft
