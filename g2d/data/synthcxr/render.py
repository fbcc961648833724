"""SynthCXR: a fast, deterministic renderer of PA chest radiographs with findings placed on request.

Pre-training on report text only teaches localisation if the image evidence sits where the report says,
so every finding here is drawn at the side/zone (or region) it is asked for and comes back with the mask
of the pixels it visibly changed. Anatomy is built from a real lung outline, so films differ in shape.

Rendering works in an additive "density" space (bright = dense, as on film), mapped to grey levels at
the end. Patient's right is the image's left (radiological convention), so side="left" draws on the
image's right half. All randomness comes from the rng argument: the anatomy takes the first draw and
each finding one more, so a film with and without a finding shares its anatomy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from g2d.data.sources.lungs import split_sides

__all__ = ["KINDS", "SIDES", "ZONES", "FindingSpec", "Radiograph", "render_radiograph"]

KINDS = (
    "opacity",
    "consolidation",
    "atelectasis",
    "effusion",
    "cardiomegaly",
    "nodule",
    "granuloma",
    "pneumothorax",
    "emphysema",
    "edema",
    "device",
    "scar",
)
SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "middle", "lower", "diffuse")

_F = np.float32
_AIR = 0.58  # density removed by a fully aerated lung; fluid or collapse puts it back


@dataclass(frozen=True)
class FindingSpec:
    """What to draw and where. `region` (bool, image-sized) pins the location and overrides side/zone."""

    kind: str
    side: str
    zone: str
    severity: float
    # compare=False: the region is payload (a SIIM shape, an RSNA box), and arrays break == and hash.
    region: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {KINDS}")
        if self.side not in SIDES:
            raise ValueError(f"unknown side {self.side!r}; expected one of {SIDES}")
        if self.zone not in ZONES:
            raise ValueError(f"unknown zone {self.zone!r}; expected one of {ZONES}")
        if not 0.0 < float(self.severity) <= 1.0:
            raise ValueError(f"severity must be in (0, 1], got {self.severity}")


@dataclass
class Radiograph:
    """A rendered film: bright = dense. masks[i] marks what findings[i] visibly changed."""

    image: np.ndarray
    masks: list[np.ndarray]
    body: np.ndarray


# --------------------------------------------------------------------------------------------- helpers


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur whose cost does not grow with sigma (three box passes beyond a few pixels)."""
    if sigma <= 0.05:
        return a
    if sigma < 3.0:
        return ndi.gaussian_filter(a, sigma, mode="nearest", truncate=3.0)
    width = max(3, int(round(math.sqrt(4.0 * sigma * sigma + 1.0))))
    out = a
    for _ in range(3):
        out = ndi.uniform_filter(out, width, mode="nearest")
    return out


@functools.lru_cache(maxsize=128)
def _bspline_matrix(n: int, m: int) -> np.ndarray:
    """Cubic B-spline upsampling weights: m control values -> n smooth samples (no bilinear diamonds)."""
    u = (np.arange(n) + 0.5) / n * (m - 3) + 1.0
    i = np.floor(u).astype(np.int64)
    f = u - i
    w = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], axis=1) / 6.0
    a = np.zeros((n, m), dtype=np.float64)
    rows = np.arange(n)
    for k in range(4):
        a[rows, i - 1 + k] += w[:, k]
    a = a.astype(_F)
    a.setflags(write=False)  # shared through the cache
    return a


def _smooth_noise(rng: np.random.Generator, n: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std noise with blobs about `cell` pixels across, for textures and patchiness."""
    m = max(4, int(math.ceil(n / max(cell, 1.0))) + 3)
    a = _bspline_matrix(n, m)
    z = a @ rng.standard_normal((m, m), dtype=_F) @ a.T
    return (z - z.mean()) / (z.std() + 1e-6)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _chaikin(points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Round a control polygon into a smooth curve (catheters and tubes do not kink)."""
    p = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        p = np.vstack([p[:1], mid, p[-1:]])
    return p


def _sample_polyline(points: np.ndarray, step: float) -> np.ndarray:
    """Points every `step` pixels along a polyline given as (k, 2) rows of (y, x)."""
    p = np.asarray(points, dtype=np.float64)
    seg = np.diff(p, axis=0)
    length = np.hypot(seg[:, 0], seg[:, 1])
    out = [p[:1]]
    for a, d, ln in zip(p[:-1], seg, length, strict=True):
        k = max(1, int(math.ceil(ln / step)))
        t = (np.arange(1, k + 1) / k)[:, None]
        out.append(a + t * d)
    return np.vstack(out)


def _splat(n: int, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bilinear point deposit onto an n x n grid: anti-aliased, order-independent, fast (one bincount)."""
    y0 = np.floor(ys)
    x0 = np.floor(xs)
    fy = ys - y0
    fx = xs - x0
    y0 = y0.astype(np.int64)
    x0 = x0.astype(np.int64)
    idx, wts = [], []
    for dy, dx, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < n) & (xx >= 0) & (xx < n)
        idx.append((yy * n + xx)[ok])
        wts.append((w * weights)[ok])
    flat = np.bincount(np.concatenate(idx), weights=np.concatenate(wts), minlength=n * n)
    return flat.reshape(n, n).astype(_F)


def _lines(n: int, polylines: Sequence[np.ndarray], sigma: float, amps: Sequence[float] | None = None):
    """Blurred lines whose ridge height is about `amp`: deposit density per unit length, then blur."""
    sigma = max(sigma, 0.5)
    step = 0.5
    ys, xs, ws = [], [], []
    for i, poly in enumerate(polylines):
        pts = _sample_polyline(poly, step)
        amp = 1.0 if amps is None else amps[i]
        ys.append(pts[:, 0])
        xs.append(pts[:, 1])
        ws.append(np.full(len(pts), amp * step * math.sqrt(2 * math.pi) * sigma))
    if not ys:
        return np.zeros((n, n), _F)
    return _blur(_splat(n, np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)), sigma)


def _disk_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0 or not mask.any():
        return mask
    return ndi.binary_dilation(mask, iterations=radius)


# ------------------------------------------------------------------------------------------- geometry


class _Geometry:
    """Landmarks read off the lung outline; every structure is placed relative to these."""

    def __init__(self, lungs: np.ndarray) -> None:
        n = lungs.shape[0]
        self.n = n
        self.px = n / 224.0
        yy, xx = np.mgrid[0:n, 0:n].astype(_F)
        self.yy, self.xx = yy, xx
        self.yc = np.arange(n, dtype=_F)[:, None]
        self.xc = np.arange(n, dtype=_F)[None, :]
        right, left = split_sides(lungs)
        if not right.any() or not left.any():
            raise ValueError("lung mask must contain both lungs (two blobs side by side)")
        self.set_lungs(right, left)
        rows = np.nonzero(lungs.any(axis=1))[0]
        cols = np.nonzero(lungs.any(axis=0))[0]
        self.top, self.bottom = float(rows[0]), float(rows[-1])
        self.x_lo, self.x_hi = float(cols[0]), float(cols[-1])
        self.T = self.x_hi - self.x_lo + 1.0  # thoracic width
        self.H = self.bottom - self.top + 1.0  # lung height
        both = right.any(axis=1) & left.any(axis=1)
        r_med = n - 1 - np.argmax(right[:, ::-1], axis=1)
        l_med = np.argmax(left, axis=1)
        upper = both & (np.arange(n) < self.top + 0.6 * self.H)
        use = upper if upper.any() else both
        if use.any():
            self.x_mid = float(np.median(0.5 * (r_med[use] + l_med[use])))
        else:
            self.x_mid = 0.5 * (np.nonzero(right.any(0))[0][-1] + np.nonzero(left.any(0))[0][0])
        self.side_info = {}
        for side, m, med_of_row, sign in (("right", right, r_med, -1.0), ("left", left, l_med, 1.0)):
            r = np.nonzero(m.any(axis=1))[0]
            c = np.nonzero(m.any(axis=0))[0]
            top, bot = float(r[0]), float(r[-1])
            lat = float(c[0] if sign < 0 else c[-1])
            med = float(c[-1] if sign < 0 else c[0])
            frac = 0.42 if side == "right" else 0.38  # the left hilum sits a little higher
            hy = int(round(top + frac * (bot - top)))
            rows_ok = np.nonzero(m.any(axis=1))[0]
            hy = int(rows_ok[np.argmin(np.abs(rows_ok - hy))])
            hx = float(med_of_row[hy]) - sign * 0.02 * self.T
            self.side_info[side] = {
                "top": top,
                "bot": bot,
                "lat": lat,
                "med": med,
                "sign": sign,
                "hilum": (float(hy), hx),
            }

    def set_lungs(self, right: np.ndarray, left: np.ndarray) -> None:
        self.lung = {"right": right, "left": left}
        self.lungs = right | left
        # lowest lung row per column (the diaphragm), bridged across the mediastinum
        n = self.n
        any_col = self.lungs.any(axis=0)
        low = n - 1 - np.argmax(self.lungs[::-1], axis=0)
        cols = np.nonzero(any_col)[0]
        self.base = np.interp(np.arange(n), cols, low[cols]).astype(_F)

    def sides(self, side: str) -> tuple[str, ...]:
        return ("right", "left") if side == "bilateral" else (side,)

    def zone_rows(self, side: str, zone: str) -> tuple[float, float]:
        s = self.side_info[side]
        h = s["bot"] - s["top"] + 1.0
        k = {"upper": 0, "middle": 1, "lower": 2}.get(zone)
        if k is None:
            return s["top"], s["bot"] + 1.0
        return s["top"] + k * h / 3.0, s["top"] + (k + 1) * h / 3.0

    def zone_mask(self, side: str, zone: str) -> np.ndarray:
        y0, y1 = self.zone_rows(side, zone)
        band = (self.yc >= y0) & (self.yc < y1)
        return self.lung[side] & band

    def lateralness(self, side: str) -> np.ndarray:
        """0 at the lung's medial edge, 1 at its lateral edge (a (1, n) row)."""
        s = self.side_info[side]
        return np.clip((self.xc - s["med"]) / (s["lat"] - s["med"] + 1e-6), 0.0, 1.0)


class _Context:
    """Geometry plus the anatomy fields that findings add to or override."""

    def __init__(self, geo: _Geometry) -> None:
        g = geo
        n = g.n
        self.g = g
        self.air_gain = np.zeros((n, n), _F)  # extra lucency (emphysema, pneumothorax)
        self.vessel_keep = np.ones((n, n), _F)  # where markings survive
        self.ctr: float | None = None
        self._interior: dict[str, np.ndarray] = {}
        self._soft: dict[str, np.ndarray] = {}
        self.air: np.ndarray | None = None  # filled in by the anatomy pass
        self.heart: np.ndarray | None = None

    def lung_soft(self, side: str) -> np.ndarray:
        if side not in self._soft:
            self._soft[side] = _blur(self.g.lung[side].astype(_F), max(0.6 * self.g.px, 0.4))
        return self._soft[side]

    def interior(self, side: str) -> np.ndarray:
        if side not in self._interior:
            m = self.g.lung[side]
            r = max(1, int(round(0.025 * self.g.T)))
            self._interior[side] = ndi.binary_erosion(m, iterations=r) if r > 0 else m
        return self._interior[side]

    def heart_zone(self) -> np.ndarray:
        if "heart" not in self._interior:
            self._interior["heart"] = _disk_dilate(self.heart, max(1, int(round(0.03 * self.g.T))))
        return self._interior["heart"]

    def invalidate(self) -> None:
        self._interior.clear()
        self._soft.clear()

    def pick_point(self, rng: np.random.Generator, side: str, zone: str) -> tuple[float, float]:
        """A random (y, x) well inside the lung zone, so the finding neither spills out nor hides."""
        g = self.g
        zm = g.zone_mask(side, zone)
        core = self.interior(side) & zm
        # behind the heart a finding would be hidden, which defeats the purpose of the label
        clear = core & ~self.heart_zone() if self.heart is not None else core
        # and hugging the mediastinum it would read as the other side or as a hilum
        lateral = clear & (g.lateralness(side) >= 0.2)
        point = _random_pixel(rng, (lateral, clear, core, zm, g.lung[side]))
        return point if point is not None else g.side_info[side]["hilum"]

    def placements(self, rng: np.random.Generator, spec: FindingSpec, allowed: np.ndarray | None):
        """(side, point) pairs for a focal finding: one per requested side, or one inside the region."""
        g = self.g
        if allowed is None:
            return [(side, self.pick_point(rng, side, spec.zone)) for side in g.sides(spec.side)]
        inner = self.interior("right") | self.interior("left")
        core = ndi.binary_erosion(allowed, iterations=max(1, int(round(0.02 * g.T))))
        point = _random_pixel(rng, (core & inner, allowed & g.lungs, core, allowed))
        if point is None:  # render_radiograph never draws an empty region; stay total anyway
            point = g.side_info["right"]["hilum"]
        y, x = int(point[0]), int(point[1])
        side = "right" if g.lung["right"][y, x] or (not g.lung["left"][y, x] and x < g.x_mid) else "left"
        return [(side, point)]


def _random_pixel(rng: np.random.Generator, candidates) -> tuple[float, float] | None:
    """A uniformly drawn pixel from the first non-empty candidate mask."""
    for cand in candidates:
        idx = np.flatnonzero(cand)
        if idx.size:
            k = int(idx[int(rng.integers(idx.size))])
            n = cand.shape[1]
            return float(k // n), float(k % n)
    return None


# ------------------------------------------------------------------------------------------- anatomy


def _anatomy_params(rng: np.random.Generator) -> dict[str, float]:
    """All per-film anatomical variation, drawn up front so findings never shift the anatomy's draws."""
    u = rng.uniform
    return {
        "torso": u(1.12, 1.25),
        "shoulders": u(1.38, 1.52),
        "axilla": u(0.22, 0.34),
        "neck": u(0.13, 0.17),
        "shoulder": u(0.01, 0.06),
        "ctr": u(0.40, 0.48),
        "heart_h": u(0.40, 0.48),
        "heart_r": u(0.32, 0.40),
        "knob_y": u(0.15, 0.24),
        "knob": u(0.03, 0.07),
        "svc": u(0.07, 0.11),
        "rib_amp": u(0.26, 0.34),
        "rib_n": u(9.2, 10.2),
        "rib_phase_l": u(-0.25, 0.25),
        "rib_first": u(-0.05, 0.0),
        "rib_duty": u(0.36, 0.44),
        "rib_dens": u(0.20, 0.28),
        "clav_y": u(0.10, 0.17),
        "clav_tilt": u(0.14, 0.22),
        "spine_dx": u(-0.015, 0.015),
        "spine_phase": u(0.0, 1.0),
        "bubble": u(0.0, 1.0),
        "bubble_size": u(0.6, 1.3),
        "k": u(1.15, 1.45),
        "lo": u(-0.06, 0.0),
        "hi": u(0.92, 1.00),
        "gamma": u(0.85, 1.15),
        "grain": u(0.010, 0.022),
        "vessel": u(0.26, 0.36),
    }


def _vessel_points(geo: _Geometry, rng: np.random.Generator, side: str):
    """A random branching tree from the hilum: thick short trunks, thinning, fading toward the pleura."""
    s = geo.side_info[side]
    sign = s["sign"]
    hy, hx = s["hilum"]
    n_trunks = 7
    ang = np.deg2rad(np.linspace(-105.0, 115.0, n_trunks) + rng.normal(0.0, 9.0, n_trunks))
    width = abs(s["lat"] - s["med"]) + 1.0
    length = 0.30 * width * rng.uniform(0.8, 1.2, n_trunks)
    y = np.full(n_trunks, hy)
    x = np.full(n_trunks, hx)
    w = np.ones(n_trunks)
    out = {"thick": ([], [], []), "thin": ([], [], [])}
    step = 0.6
    for gen in range(6):
        dy = np.sin(ang) * length
        dx = sign * np.cos(ang) * length
        k = max(2, int(math.ceil(length.max() / step)))
        t = (np.arange(k) + 0.5) / k
        py = (y[:, None] + t[None, :] * dy[:, None]).ravel()
        px_ = (x[:, None] + t[None, :] * dx[:, None]).ravel()
        pw = np.repeat(w * length / k, k)
        key = "thick" if gen < 2 else "thin"
        out[key][0].append(py)
        out[key][1].append(px_)
        out[key][2].append(pw)
        y, x = y + dy, x + dx
        spread = np.deg2rad(rng.uniform(16.0, 34.0, (2, len(ang))))
        ang = np.concatenate([ang - spread[0], ang + spread[1]]) + np.deg2rad(rng.normal(0, 6, 2 * len(ang)))
        length = np.concatenate([length, length]) * rng.uniform(0.62, 0.82, 2 * len(length))
        y, x = np.concatenate([y, y]), np.concatenate([x, x])
        w = np.concatenate([w, w]) * 0.62
    return {k: tuple(np.concatenate(v) for v in vals) for k, vals in out.items()}


def _vessels(geo: _Geometry, rng: np.random.Generator) -> np.ndarray:
    n, px = geo.n, geo.px
    fields = {}
    for key, sigma in (("thick", max(1.5 * px, 0.6)), ("thin", max(0.65 * px, 0.45))):
        ys, xs, ws = [], [], []
        for side in ("right", "left"):
            pts = _vessel_points(geo, rng, side)[key]
            hy, hx = geo.side_info[side]["hilum"]
            width = abs(geo.side_info[side]["lat"] - geo.side_info[side]["med"]) + 1.0
            dist = np.hypot(pts[0] - hy, pts[1] - hx) / width
            fade = np.exp(-((dist / 0.75) ** 2))  # markings fade toward the periphery
            ys.append(pts[0])
            xs.append(pts[1])
            ws.append(pts[2] * fade * math.sqrt(2 * math.pi) * sigma)
        fields[key] = _blur(_splat(n, np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)), sigma)
    return 0.9 * fields["thick"] + fields["thin"]


def _heart(geo: _Geometry, ctr: float, height: float, right_share: float) -> np.ndarray:
    """Heart silhouette: right-atrial convexity just right of the spine (image left), the larger
    left-ventricular convexity sweeping down to an apex on the left dome (image right).

    Borders are per-row profiles so the width is exactly ctr x the thoracic width and the heart sits
    on the diaphragm without a gap.
    """
    g = geo
    width = ctr * g.T
    w_r, w_l = right_share * width, (1.0 - right_share) * width
    x_probe = int(np.clip(round(g.x_mid + 0.5 * w_l), 0, g.n - 1))
    y_b = float(g.base[x_probe])
    hh = height * g.H * (1.0 + 1.2 * max(0.0, ctr - 0.48))
    v = np.clip((g.yc - (y_b - hh)) / hh, 0.0, 1.0)
    x_r = g.x_mid - w_r * np.sqrt(np.clip(1.0 - ((v - 0.66) / 0.62) ** 2, 0.0, 1.0))
    x_l = g.x_mid + w_l * np.sqrt(np.clip(1.0 - ((v - 0.80) / 0.84) ** 2, 0.0, 1.0))
    floor = g.base[None, :] + 0.01 * g.H  # it sits on the diaphragm, no lung shows underneath
    return (g.yc >= y_b - hh) & (g.yc <= floor) & (g.xc > x_r) & (g.xc < x_l)


def _anatomy(ctx: _Context, p: dict[str, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Density of a normal chest (with the structural changes findings requested). Returns (D, body)."""
    g = ctx.g
    n, px, T, H = g.n, g.px, g.T, g.H
    yc, xc = g.yc, g.xc
    xm = g.x_mid

    # body: neck, shoulders running out into the arms, a torso a little wider than the lungs
    y_sh = g.top - p["shoulder"] * n  # shoulder line
    y_ax = g.top + p["axilla"] * H  # where the arms leave the torso
    hw_t = p["torso"] * 0.5 * T * (1.0 + 0.05 * np.clip((yc - g.top) / H, 0.0, 2.0))
    hw_sh = p["shoulders"] * 0.5 * T
    rise = _smoothstep(y_sh - 0.16 * n, y_sh + 0.01 * n, yc)
    hw_up = p["neck"] * T + (hw_sh - p["neck"] * T) * np.sqrt(rise)  # rounded shoulder slope
    hw_torso = np.minimum(hw_up, hw_t)
    ax = np.abs(xc - xm)
    thick = np.sqrt(np.clip(1.0 - (ax / hw_torso) ** 2, 0.0, 1.0))
    arm_on = yc < y_ax - 0.03 * n * (ax - hw_t) / (hw_sh - hw_t + 1e-3)  # rounded lower arm edge
    c_arm, r_arm = 0.5 * (hw_t + hw_up), 0.5 * (hw_up - hw_t) + 1e-3
    arm_thick = np.sqrt(np.clip(1.0 - ((ax - c_arm) / r_arm) ** 2, 0.0, 1.0)) * (ax > hw_t) * arm_on
    body = (thick > 0.0) | (arm_thick > 0.0)
    soft = 0.78 * thick
    arm = 0.75 * arm_thick
    for sign in (-1.0, 1.0):  # humeral heads
        r = 0.085 * T
        d = np.hypot((xc - (xm + sign * (hw_sh - 0.10 * T))) / r, (yc - (y_sh + 0.06 * n)) / (1.1 * r))
        arm = arm + (0.28 * np.clip(1.0 - d**2, 0.0, 1.0) ** 0.3 + 0.12 * np.exp(-(((d - 1.0) / 0.12) ** 2)))

    lung_f = g.lungs.astype(_F)
    sharp = _blur(lung_f, max(0.6 * px, 0.4))

    # spine with vertebral bodies, disc spaces and pedicle rings
    x_s = xm + p["spine_dx"] * T * np.sin(yc / n * 3.0)
    hw_s = 0.075 * T
    dx = (xc - x_s) / hw_s
    period = H / 10.0
    f = np.mod((yc - g.top) / period + p["spine_phase"], 1.0)
    plate = np.exp(-(((f - 0.03) / 0.05) ** 2)) + np.exp(-(((f - 0.80) / 0.05) ** 2))
    disc = _smoothstep(0.82, 0.86, f) * (1 - _smoothstep(0.96, 1.0, f))
    column = np.clip(1.0 - dx**2, 0.0, 1.0) ** 0.5
    spine = column * (0.12 + 0.06 * plate - 0.06 * disc)
    ring = np.zeros_like(spine)
    for sign in (-1.0, 1.0):
        r = np.hypot((xc - (x_s + sign * 0.62 * hw_s)) / (0.2 * hw_s), (f - 0.35) * period / (0.17 * period))
        ring = ring + np.exp(-(((r - 1.0) / 0.35) ** 2))
    spine = spine + 0.06 * ring

    # mediastinum: a soft central column; trachea and main bronchi as air
    medi = 0.15 * np.exp(-(((xc - xm) / (0.11 * T)) ** 2)) * _smoothstep(g.top - 0.3 * H, g.top, yc)
    rh, lh = g.side_info["right"]["hilum"], g.side_info["left"]["hilum"]
    carina = (g.top + 0.30 * H, xm + 0.01 * T)
    trachea = _lines(n, [np.array([[0.0, xm + 0.005 * T], [carina[0] - 0.04 * H, xm], carina])], 0.028 * T)
    bronchi = _lines(n, [np.array([carina, rh]), np.array([carina, lh])], 0.015 * T)
    airway = np.clip(trachea + 0.8 * bronchi, 0.0, 1.0)

    # heart
    ctr = p["ctr"] if ctx.ctr is None else ctx.ctr
    heart = _heart(g, ctr, p["heart_h"], p["heart_r"])
    ctx.heart = heart
    # vascular pedicle above it: SVC line on the right, aortic knob and pulmonary trunk on the left
    hrows = np.nonzero(heart.any(axis=1))[0]
    h_top = float(hrows[0]) if hrows.size else g.top + 0.5 * H
    knob_y = g.top + p["knob_y"] * H
    x_right = xm - p["svc"] * T
    x_left = (
        xm
        + 0.07 * T
        + p["knob"] * T * np.exp(-(((yc - knob_y) / (0.06 * H)) ** 2))
        + 0.03 * T * np.exp(-(((yc - knob_y - 0.14 * H) / (0.05 * H)) ** 2))
    )
    pedicle = (yc > g.top - 0.2 * H) & (yc < h_top + 0.12 * H) & (xc > x_right) & (xc < x_left)
    silhouette = heart | pedicle
    heart_s = _blur(silhouette.astype(_F), max(0.9 * px, 0.5))

    # posterior ribs: one curvilinear coordinate per side, each unit of it one rib + one interspace
    t = np.abs(xc - xm) / (np.where(xc < xm, xm - g.x_lo, g.x_hi - xm) + 0.03 * T)
    shape = -1.5 * t + 1.7 * t**2  # rises from the spine, arcs over, falls at the lateral wall
    y_first = g.top + p["rib_first"] * H
    y_end = g.bottom - 0.02 * H
    yn = np.clip((yc - y_first) / (y_end - y_first), 0.0, 1.5)
    amp = p["rib_amp"] * H * (1.3 - 0.6 * yn)
    u = (yc - amp * shape - y_first) / (y_end - y_first)
    u = u + np.where(xc > xm, p["rib_phase_l"] / p["rib_n"], 0.0)
    sr = p["rib_n"] * np.sign(u) * np.abs(u) ** 0.9
    k = np.floor(sr)
    fr = sr - k
    duty = p["rib_duty"]
    spacing_px = (y_end - y_first) / p["rib_n"]
    edge = max(1.0 * px, 0.6) / spacing_px
    band = np.clip(np.minimum(fr, duty - fr) / edge, 0.0, 1.0)
    cortex = ((2.0 * fr / duty - 1.0) ** 4) * (fr < duty)
    lateral = _smoothstep(0.06, 0.16, t) * (1.0 - _smoothstep(1.05, 1.25, t))
    ribs = p["rib_dens"] * band * (0.7 + 0.45 * cortex) * lateral * ((k >= 0) & (k < 11))
    # faint anterior ribs, sloping down toward the midline
    ua = (yc - 0.28 * H * (1.0 - t) - (g.top - 0.05 * H)) / (1.15 * spacing_px)
    fa = ua - np.floor(ua)
    ant = np.clip(np.minimum(fa, 0.38 - fa) / (1.5 * edge), 0.0, 1.0) * _smoothstep(0.3, 0.5, t)
    ribs = ribs + 0.09 * ant * (1.0 - _smoothstep(1.0, 1.15, t)) * (ua > 0) * (ua < 7)
    # bone contrast is highest against aerated lung, low through soft tissue and the upper abdomen
    below_dome = _smoothstep(0.0, 0.04 * n, yc - g.base[None, :])
    ribs = ribs * (0.45 + 0.55 * sharp) * (1.0 - 0.55 * below_dome) * (1.0 - 0.45 * heart_s) * (thick > 0)

    # clavicles
    tc = (np.abs(xc - xm) - 0.07 * T) / (0.58 * T)
    y_c = (
        g.top + p["clav_y"] * H - p["clav_tilt"] * H * np.clip(tc, 0.0, 1.0) ** 0.8 - 0.015 * H * np.sin(2 * np.pi * tc)
    )
    th = 0.055 * H * (1.3 - 0.45 * tc)  # club-shaped medial end
    dc = np.abs(yc - y_c) / (0.5 * th)
    inside = (tc > 0.0) & (tc < 1.0)
    clav = np.clip(1.0 - dc**2, 0.0, 1.0) ** 0.3 * (0.30 + 0.16 * np.exp(-(((1 - dc) / 0.25) ** 2))) * inside
    clav = clav * _smoothstep(0.0, 0.05, tc) * (1.0 - _smoothstep(0.92, 1.0, tc))

    # lungs: air, thickest centrally, with markings from the hila
    vol = _blur(lung_f, 0.05 * n)
    depth = 0.55 + 0.45 * _smoothstep(0.35, 0.85, vol)
    air = sharp * depth * (1.0 + ctx.air_gain) * (1.0 - 0.85 * heart_s)
    ctx.air = air
    vessels = _vessels(g, rng) * p["vessel"]
    hila = np.zeros((n, n), _F)
    for hy, hx in (rh, lh):
        hila += np.exp(-(((xc - hx) / (0.05 * T)) ** 2 + ((yc - hy) / (0.07 * H)) ** 2))
    texture = 0.025 * _smooth_noise(rng, n, max(2.5 * px, 1.5))
    markings = (vessels + 0.22 * hila + texture) * sharp * ctx.vessel_keep * (1.0 - 0.5 * heart_s)

    # abdomen below the domes, with a gastric bubble under the left one (image right)
    below = yc > g.base[None, :] + 0.5
    abd = 0.30 * below * _smoothstep(0.0, 0.05 * n, yc - g.base[None, :])
    if p["bubble"] < 0.7:
        bx = xm + 0.30 * T
        by = float(g.base[int(np.clip(round(bx), 0, n - 1))]) + 0.045 * n * p["bubble_size"]
        ell = ((xc - bx) / (0.075 * T * p["bubble_size"])) ** 2 + ((yc - by) / (0.03 * n * p["bubble_size"])) ** 2
        abd = abd - 0.35 * np.clip(1.0 - ell, 0.0, 1.0) ** 0.5 * below

    d = soft + arm + spine + medi + 0.30 * heart_s + ribs + clav + markings + abd - _AIR * air - 0.55 * airway
    return (d * body).astype(_F), body


def _film(d: np.ndarray, p: dict[str, float], rng: np.random.Generator, px: float) -> np.ndarray:
    """Density -> grey levels: film-like saturation, per-film exposure, a little blur, grain."""
    n = d.shape[0]
    img = 1.0 - np.exp(-p["k"] * np.clip(d, 0.0, None))
    img = (img - p["lo"]) / (p["hi"] - p["lo"])
    img = np.clip(img, 0.0, 1.0) ** p["gamma"]
    img = _blur(img, max(0.55 * px, 0.35))
    img = img + p["grain"] * rng.standard_normal((n, n), dtype=_F)
    img = img + 0.012 * _smooth_noise(rng, n, max(3.0 * px, 2.0))
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- findings
#
# Each drawer returns (delta, mask): delta is added to the density, mask marks what visibly changed.
# `allowed` is region ∩ dilated lungs when the caller pinned the location, else None.


def _visible(delta: np.ndarray, frac: float = 0.3, floor: float = 0.03) -> np.ndarray:
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    if peak <= 0:
        return np.zeros(delta.shape, dtype=bool)
    return np.abs(delta) > max(frac * peak, floor)


def _ellipse_env(g: _Geometry, cy: float, cx: float, rx: float, ry: float, angle: float, power: float):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = g.xc - cx, g.yc - cy
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    return np.exp(-((u * u + v * v) ** power))


def _region_envelope(allowed: np.ndarray) -> np.ndarray:
    """Soft 0..1 blob filling a pinned region, fading toward its edges."""
    rows = np.nonzero(allowed.any(axis=1))[0]
    cols = np.nonzero(allowed.any(axis=0))[0]
    extent = min(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    env = _blur(allowed.astype(_F), max(0.15 * extent, 0.5))
    return np.clip(env / max(float(env.max()), 1e-6) * 1.25, 0.0, 1.0)


def _draw_airspace(ctx, spec, rng, allowed, consolidation: bool):
    """Patchy (opacity) or confluent (consolidation) airspace density inside the lung."""
    g = ctx.g
    n, sev = g.n, spec.severity
    field_ = np.zeros((n, n), _F)
    if allowed is not None:
        # a heavy blur rounds a box into a blob, so the box outline itself never shows on the film
        field_ = _region_envelope(allowed)
        limit = allowed
        cell = max(0.04 * g.T, 2.0)
    else:
        limit = np.zeros((n, n), bool)
        for side in g.sides(spec.side):
            limit |= g.lung[side]
            if spec.zone == "diffuse":
                env = 0.5 + 0.5 * _smoothstep(-0.6, 0.8, _smooth_noise(rng, n, 0.18 * g.T))
                env = env * g.lung[side]
            else:
                cy, cx = ctx.pick_point(rng, side, spec.zone)
                r = ((0.07 + 0.09 * sev) if consolidation else (0.06 + 0.08 * sev)) * g.T
                env = _ellipse_env(
                    g,
                    cy,
                    cx,
                    r * rng.uniform(0.8, 1.3),
                    r * rng.uniform(0.7, 1.1),
                    rng.uniform(0, np.pi),
                    1.3,
                )
            field_ = np.maximum(field_, env)
        cell = max((0.035 if consolidation else 0.045) * g.T, 2.0)
    tex = _smooth_noise(rng, n, cell)
    if consolidation:
        patch = np.clip(1.7 * field_ * (1.0 + 0.25 * tex) - 0.35, 0.0, 1.0)
    else:
        patch = np.clip(field_ * (1.0 + 0.8 * tex) - 0.25, 0.0, None) / 0.75
        patch = np.clip(patch, 0.0, 1.0) ** 0.8
    soft_limit = _blur(limit.astype(_F), max(0.6 * g.px, 0.4)) * limit
    patch = patch * soft_limit
    if consolidation:
        delta = patch * (_AIR * ctx.air + 0.08 + 0.08 * sev)
        # air bronchograms: dark branching tubes inside the consolidation
        ys, xs = np.nonzero(patch > 0.8)
        if ys.size > 20:
            i = int(rng.integers(ys.size))
            side = "right" if xs[i] < g.x_mid else "left"
            hy, hx = g.side_info[side]["hilum"]
            ang = math.atan2(ys[i] - hy, xs[i] - hx)
            polys = []
            for _ in range(3):
                a = ang + rng.normal(0, 0.35)
                ln = rng.uniform(0.05, 0.10) * g.T
                start = np.array([ys[i], xs[i]], float) - 0.5 * ln * np.array([math.sin(a), math.cos(a)])
                mid = start + ln * np.array([math.sin(a), math.cos(a)])
                b = a + rng.normal(0, 0.4)
                end = mid + 0.6 * ln * np.array([math.sin(b), math.cos(b)])
                polys.append(np.array([start, mid, end]))
            bron = np.clip(_lines(n, polys, max(0.7 * g.px, 0.5)), 0.0, 1.0)
            delta = delta * (1.0 - 0.55 * bron * (patch > 0.6))
    else:
        delta = (0.30 + 0.22 * sev) * patch
    return delta, _visible(delta, 0.3) & limit


def _draw_atelectasis(ctx, spec, rng, allowed):
    """Plate-like band or a wedge pointing at the hilum."""
    g = ctx.g
    n, sev = g.n, spec.severity
    delta = np.zeros((n, n), _F)
    for side, (cy, cx) in ctx.placements(rng, spec, allowed):
        info = g.side_info[side]
        lung_w = abs(info["lat"] - info["med"]) + 1.0
        if rng.uniform() < 0.6:
            length = (0.28 + 0.25 * sev) * lung_w
            a = rng.uniform(-0.3, 0.3)
            d = np.array([math.sin(a), math.cos(a)])
            bend = rng.normal(0, 0.06 * length)
            pts = np.array([[cy, cx] - 0.5 * length * d, [cy + bend, cx], [cy, cx] + 0.5 * length * d])
            sig = max((0.008 + 0.007 * sev) * n, 0.6)
            shape = np.clip(_lines(n, [_chaikin(pts, 2)], sig), 0.0, 1.0)
            amp = 0.50 + 0.20 * sev
        else:
            hy, hx = info["hilum"]
            v = np.array([cy - hy, cx - hx])
            v = v / (np.hypot(*v) + 1e-6)
            perp = np.array([-v[1], v[0]])
            size = (0.12 + 0.10 * sev) * lung_w
            # apex toward the hilum, base run out past the pleura (the lung edge then clips it)
            apex = np.array([cy, cx]) - 0.9 * size * v
            b1 = np.array([cy, cx]) + 2.0 * size * v + 0.7 * size * perp
            b2 = np.array([cy, cx]) + 2.0 * size * v - 0.7 * size * perp
            tri = _triangle(g, apex, b1, b2)
            shape = _blur(tri.astype(_F), max(0.12 * size, 0.5))
            shape = shape * (0.85 + 0.15 * _smooth_noise(rng, n, max(0.3 * size, 2.0)))
            amp = 0.38 + 0.20 * sev
        delta += amp * shape * ctx.lung_soft(side)
    if allowed is not None:
        delta *= allowed
    return delta, _visible(delta, 0.3)


def _triangle(g: _Geometry, a, b, c) -> np.ndarray:
    def edge(p, q):
        return (q[1] - p[1]) * (g.yc - p[0]) - (q[0] - p[0]) * (g.xc - p[1])

    e1, e2, e3 = edge(a, b), edge(b, c), edge(c, a)
    return ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))


def _draw_effusion(ctx, spec, rng, allowed):
    """Fluid at the base with a meniscus climbing the lateral wall; it hides the dome and the angle."""
    g = ctx.g
    n, sev = g.n, spec.severity
    fill = np.zeros((n, n), _F)
    if allowed is not None:
        y0 = float(np.nonzero(allowed.any(axis=1))[0][0])
        grad = np.clip((g.yc - y0) / max(0.06 * g.H, 1.0), 0.0, 1.0)
        fill = np.maximum(_blur(allowed.astype(_F), max(1.0 * g.px, 0.5)), 0.6 * allowed)
        fill = fill * (0.6 + 0.4 * grad) * allowed
        limit = allowed
    else:
        limit = np.zeros((n, n), bool)
        for side in g.sides(spec.side):
            info = g.side_info[side]
            h = info["bot"] - info["top"] + 1.0
            height = (0.12 + 0.33 * sev) * h * rng.uniform(0.9, 1.1)
            level = info["bot"] - height
            lat = g.lateralness(side)
            meniscus = (0.25 + 0.30 * sev) * height + 0.05 * h
            surface = level - meniscus * lat**1.6
            edge = max(0.05 * h, 1.5)
            f = np.clip((g.yc - surface) / edge, 0.0, 1.0)
            f = f * (0.85 + 0.15 * _smoothstep(0.0, 0.3 * h, g.yc - surface))
            fill = np.maximum(fill, f * ctx.lung_soft(side))
            limit |= g.lung[side]
    delta = fill * (_AIR * ctx.air + 0.12)
    mask = (fill > 0.35) & limit
    return delta, mask


def _draw_nodule(ctx, spec, rng, allowed, calcified: bool):
    """Round density; a granuloma is small, dense and sharp (calcified)."""
    g = ctx.g
    n, sev = g.n, spec.severity
    delta = np.zeros((n, n), _F)
    mask = np.zeros((n, n), bool)
    for _side, (cy, cx) in ctx.placements(rng, spec, allowed):
        if calcified:
            r = max((0.006 + 0.006 * sev) * n, 0.9)
        else:
            r = max((0.02 + 0.02 * sev) * n, 1.2)
        pad = int(math.ceil(r * 1.6 + 2))
        y0, y1 = max(0, int(cy) - pad), min(n, int(cy) + pad + 1)
        x0, x1 = max(0, int(cx) - pad), min(n, int(cx) + pad + 1)
        yy = g.yy[y0:y1, x0:x1] - cy
        xx = g.xx[y0:y1, x0:x1] - cx
        theta = np.arctan2(yy, xx)
        if calcified:
            rr = r
            d = np.hypot(yy, xx) / rr
            prof = np.clip((1.0 - d) * rr + 0.5, 0.0, 1.0)  # one-pixel anti-aliased edge: sharp
            amp = 1.15
        else:
            lob = 1.0 + 0.08 * np.cos(3 * theta + rng.uniform(0, 6.3)) + 0.05 * np.cos(5 * theta + rng.uniform(0, 6.3))
            d = np.hypot(yy, xx) / (r * lob)
            prof = np.clip(1.0 - d**2, 0.0, 1.0) ** 0.35
            amp = 0.42 + 0.12 * sev
        delta[y0:y1, x0:x1] = np.maximum(delta[y0:y1, x0:x1], amp * prof)
        m = d <= 1.0
        if not m.any():
            m[int(round(cy)) - y0, int(round(cx)) - x0] = True
        mask[y0:y1, x0:x1] |= m
    if calcified:
        mask = _disk_dilate(mask, 1)
    if allowed is not None:
        delta *= allowed
        mask &= allowed
    return delta, mask


def _draw_scar(ctx, spec, rng, allowed):
    """A few thin, irregular strands radiating from one spot."""
    g = ctx.g
    n, sev = g.n, spec.severity
    polys = []
    sides = []
    for side, (cy, cx) in ctx.placements(rng, spec, allowed):
        sides.append(side)
        for _ in range(int(rng.integers(2, 5))):
            a = rng.uniform(0, 2 * np.pi)
            pts = [np.array([cy, cx])]
            for _ in range(int(rng.integers(3, 6))):
                a += rng.normal(0, 0.5)
                step = (0.02 + 0.025 * sev) * g.T * rng.uniform(0.6, 1.3)
                pts.append(pts[-1] + step * np.array([math.sin(a), math.cos(a)]))
            polys.append(np.array(pts))
    lines = np.clip(_lines(n, polys, max(0.75 * g.px, 0.5)), 0.0, 1.2)
    lung_s = sum(ctx.lung_soft(s) for s in sides)
    delta = (0.45 + 0.20 * sev) * lines * np.clip(lung_s, 0, 1)
    mask = _disk_dilate(_visible(delta, 0.25), 1)
    if allowed is not None:
        delta *= allowed
        mask &= allowed
    return delta, mask


def _draw_edema(ctx, spec, rng, allowed):
    """Perihilar (batwing) haze with septal (Kerley B) lines at the lateral bases."""
    g = ctx.g
    n, sev = g.n, spec.severity
    haze = np.zeros((n, n), _F)
    lines = []
    if allowed is not None:
        haze = _blur(allowed.astype(_F), max(1.5 * g.px, 0.5)) * allowed
        limit = allowed
    else:
        limit = np.zeros((n, n), bool)
        for side in g.sides(spec.side):
            info = g.side_info[side]
            hy, hx = info["hilum"]
            shift = {"upper": -0.22, "lower": 0.22}.get(spec.zone, 0.0) * g.H
            cx = hx - info["sign"] * 0.10 * g.T
            rx = (0.20 + 0.12 * sev) * g.T
            ry = (0.20 + 0.10 * sev) * g.H
            env = np.exp(-((((g.xc - cx) / rx) ** 2 + ((g.yc - hy - shift) / ry) ** 2) ** 1.2))
            haze = np.maximum(haze, env * ctx.lung_soft(side))
            limit |= g.lung[side]
            if spec.zone in ("diffuse", "lower"):
                y0, y1 = g.zone_rows(side, "lower")
                lat_edge = info["lat"] - info["sign"] * 0.01 * g.T
                for _ in range(int(2 + round(4 * sev))):
                    y = rng.uniform(y0, y1 - 0.03 * g.H)
                    ln = rng.uniform(0.03, 0.06) * g.T
                    lines.append(np.array([[y, lat_edge], [y + rng.normal(0, 0.3), lat_edge - info["sign"] * ln]]))
    tex = _smooth_noise(rng, n, max(0.03 * g.T, 2.0))
    # zero crossings of smooth noise form a fine curvilinear network: the interstitial lines
    net = np.exp(-((_smooth_noise(rng, n, max(0.05 * g.T, 3.0)) / 0.18) ** 2))
    haze = np.clip(haze, 0.0, None)
    delta = (0.30 + 0.30 * sev) * haze * (0.85 + 0.2 * tex) + (0.10 + 0.10 * sev) * net * haze
    if lines:
        kb = np.clip(_lines(n, lines, max(0.5 * g.px, 0.5)), 0.0, 1.0)
        delta = delta + 0.28 * kb * g.lungs
    delta = delta * limit
    return delta, _visible(delta, 0.3) & limit


def _draw_device(ctx, spec, rng, allowed):
    """Radiopaque tubes and lines, or a pacemaker generator with its leads, on the requested side."""
    g = ctx.g
    n, T, H, xm, top = g.n, g.T, g.H, g.x_mid, g.top
    heart = ctx.heart
    hy_rows = np.nonzero(heart.any(axis=1))[0]
    h_top, h_bot = (float(hy_rows[0]), float(hy_rows[-1])) if hy_rows.size else (top + 0.5 * H, top + 0.9 * H)
    j = lambda s: rng.normal(0, s)  # noqa: E731 - small jitter
    polys, amps = [], []
    box = np.zeros((n, n), _F)
    sig = max(0.5 * g.px, 0.5)
    if spec.side == "bilateral":
        kind = "tubes"
    else:
        kind = ("line", "pacemaker", "chest_tube")[int(rng.integers(3))]
    sign = -1.0 if spec.side == "right" else 1.0
    if kind == "tubes":
        carina = top + 0.30 * H
        polys.append(np.array([[0, xm + j(0.01 * T)], [0.3 * carina, xm], [carina - 0.08 * H, xm + j(0.01 * T)]]))
        amps.append(0.9)
        stomach = (float(g.base[int(np.clip(xm + 0.3 * T, 0, n - 1))]) + 0.08 * H, xm + 0.3 * T)
        polys.append(np.array([[0, xm - 0.02 * T], [top + 0.5 * H, xm + 0.03 * T], [g.bottom, xm + 0.06 * T], stomach]))
        amps.append(0.8)
    elif kind == "line":
        polys.append(
            np.array(
                [
                    [top + 0.02 * H + j(0.02 * H), xm + sign * 0.58 * T],
                    [top + 0.06 * H, xm + sign * 0.30 * T],
                    [top + 0.13 * H, xm + sign * 0.10 * T],
                    [top + 0.22 * H, xm - 0.05 * T],
                    [top + 0.36 * H + j(0.03 * H), xm - 0.06 * T],
                ]
            )
        )
        amps.append(0.95)
    elif kind == "pacemaker":
        cy, cx = top + 0.07 * H + j(0.02 * H), xm + sign * (0.40 * T + j(0.02 * T))
        bw, bh = 0.085 * T, 0.06 * T
        u = np.abs(g.xc - cx) / bw
        v = np.abs(g.yc - cy) / bh
        rounded = (np.maximum(u, 0.0) ** 4 + np.maximum(v, 0.0) ** 4) <= 1.0
        box = _blur(rounded.astype(_F), max(0.5 * g.px, 0.4)) * 1.6
        for tip in ((h_top + 0.25 * (h_bot - h_top), xm - 0.07 * T), (h_bot - 0.06 * H, xm + 0.14 * T)):
            polys.append(
                np.array(
                    [
                        [cy, cx - sign * 0.8 * bw],
                        [top + 0.12 * H, xm + sign * 0.10 * T],
                        [top + 0.30 * H, xm - 0.05 * T],
                        [h_top + 0.10 * (h_bot - h_top), xm - 0.05 * T],
                        tip,
                    ]
                )
            )
            amps.append(1.0)
    else:  # chest tube entering laterally, tip toward the requested zone (apex by default)
        info = g.side_info[spec.side]
        lat = info["lat"]
        zone = "upper" if spec.zone == "diffuse" else spec.zone
        z0, z1 = g.zone_rows(spec.side, zone)
        tip_y = 0.5 * (z0 + z1)
        entry_y = info["top"] + 0.75 * (info["bot"] - info["top"])
        polys.append(
            np.array(
                [
                    [entry_y + 0.05 * H, lat + sign * 0.12 * T],
                    [entry_y, lat - sign * 0.02 * T],
                    [0.5 * (entry_y + tip_y), lat - sign * 0.10 * T],
                    [tip_y, lat - sign * (0.14 * T + j(0.02 * T))],
                ]
            )
        )
        amps.append(0.85)
        sig = max(1.0 * g.px, 0.6)
    curves = [_chaikin(p_, 3) for p_ in polys]
    delta = _lines(n, curves, sig, amps) + box
    delta = np.minimum(delta, 1.8)
    mask = _disk_dilate(_visible(delta, 0.25, 0.1), 1)
    return delta, mask


def _pneumothorax(ctx, spec, rng, allowed):
    """Collapse the lung toward its root; the gap loses markings, darkens, and shows the pleural line."""
    g = ctx.g
    n, sev = g.n, spec.severity
    ptx = np.zeros((n, n), bool)
    collapsed = np.zeros((n, n), bool)
    if allowed is not None:
        ptx = allowed.copy()
        touched = [s for s in ("right", "left") if (g.lung[s] & allowed).any()] or ["right", "left"]
        for s in touched:
            collapsed |= g.lung[s] & ~ptx
    else:
        for side in g.sides(spec.side):
            info = g.side_info[side]
            lung = g.lung[side]
            ay = info["top"] + 0.8 * (info["bot"] - info["top"])
            ax = info["med"]
            scale = 1.0 - (0.10 + 0.30 * sev) * rng.uniform(0.85, 1.15)
            sy = np.clip(np.round(ay + (g.yy - ay) / scale), 0, n - 1).astype(np.int64)
            sx = np.clip(np.round(ax + (g.xx - ax) / scale), 0, n - 1).astype(np.int64)
            shrunk = lung[sy, sx] & lung
            gap = lung & ~shrunk
            if not gap.any():  # tiny images: at least peel the apex
                rows = np.nonzero(lung.any(axis=1))[0]
                gap = lung & (g.yc <= rows[0] + 1)
                shrunk = lung & ~gap
            ptx |= gap
            collapsed |= shrunk
    if not ptx.any():
        return None, ptx
    ptx_s = _blur(ptx.astype(_F), max(0.7 * g.px, 0.45))
    ctx.vessel_keep *= 1.0 - ptx_s
    ctx.air_gain += 0.35 * ptx_s
    line = collapsed & ndi.binary_dilation(ptx) & ndi.binary_erosion(g.lungs | ptx)
    line_f = _blur(line.astype(_F), max(0.45 * g.px, 0.4))
    delta = 0.45 * line_f / max(float(line_f.max()), 1e-6) + 0.05 * sev * _blur(collapsed.astype(_F), 1.0)
    return delta, ptx


def _emphysema(ctx, spec, rng, allowed):
    """Hyperinflation: flatter, lower domes, more lucent lungs with sparse markings, bullae when severe."""
    g = ctx.g
    n, sev = g.n, spec.severity
    if allowed is not None:
        affected = allowed
    else:
        new = dict(g.lung)
        if spec.zone in ("diffuse", "lower"):
            for side in g.sides(spec.side):
                lung = g.lung[side]
                cols = lung.any(axis=0)
                low = (n - 1 - np.argmax(lung[::-1], axis=0)).astype(_F)
                target = min(float(low[cols].max()) + 0.04 * g.H * sev, n - 2.0)
                new_low = low + (target - low) * 0.7 * sev
                grow = cols[None, :] & (g.yc > low[None, :]) & (g.yc <= new_low[None, :])
                other = g.lung["left" if side == "right" else "right"]
                new[side] = lung | (grow & ~_disk_dilate(other, 1))
            g.set_lungs(new["right"], new["left"])
            ctx.invalidate()
        affected = np.zeros((n, n), bool)
        for side in g.sides(spec.side):
            affected |= g.zone_mask(side, spec.zone)
    aff_s = _blur(affected.astype(_F), max(1.5 * g.px, 0.5))
    ctx.air_gain += (0.08 + 0.14 * sev) * aff_s
    ctx.vessel_keep *= 1.0 - (0.3 + 0.4 * sev) * aff_s
    delta = np.zeros((n, n), _F)
    if sev > 0.5:
        polys = []
        core = ndi.binary_erosion(affected, iterations=max(1, int(round(0.06 * g.T))))
        idx = np.flatnonzero(core)
        for _ in range(int(rng.integers(1, 3))):
            if not idx.size:
                break
            k = idx[int(rng.integers(idx.size))]
            cy, cx = k // n, k % n
            r = rng.uniform(0.03, 0.05) * g.T
            t = np.linspace(0, 2 * np.pi, 40)
            polys.append(np.stack([cy + r * np.sin(t), cx + r * np.cos(t)], axis=1))
            ctx.air_gain += 0.25 * np.exp(-((((g.yc - cy) ** 2 + (g.xc - cx) ** 2) / (r * r)) ** 3))
        delta = 0.12 * np.clip(_lines(n, polys, max(0.5 * g.px, 0.5)), 0, 1) * affected
    return delta, affected


# ------------------------------------------------------------------------------------------- entry point


def render_radiograph(lungs: np.ndarray, findings: Sequence[FindingSpec], rng: np.random.Generator) -> Radiograph:
    """Render one PA film around `lungs` with `findings`, each masked where it visibly changed the film.

    A finding with a region that misses the (slightly dilated) lungs gets an empty mask and is not drawn;
    for cardiomegaly and devices the region only filters the mask. Never raises for that case.
    """
    lungs = np.asarray(lungs).astype(bool)
    if lungs.ndim != 2 or lungs.shape[0] != lungs.shape[1]:
        raise ValueError(f"lungs must be a square 2-D mask, got shape {lungs.shape}")
    n = lungs.shape[0]
    if n < 32:
        raise ValueError(f"lungs must be at least 32 x 32, got {n}")
    findings = list(findings)
    for f in findings:
        if not isinstance(f, FindingSpec):
            raise TypeError(f"findings must be FindingSpec, got {type(f).__name__}")
        if f.region is not None and np.shape(f.region) != lungs.shape:
            raise ValueError(f"{f.kind} region has shape {np.shape(f.region)}, expected {lungs.shape}")

    anatomy_rng = np.random.default_rng(int(rng.integers(0, 2**63 - 1)))
    finding_rngs = [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=len(findings))]
    params = _anatomy_params(anatomy_rng)

    geo = _Geometry(lungs)
    ctx = _Context(geo)
    results: list[tuple[np.ndarray | None, np.ndarray] | None] = [None] * len(findings)

    def allowed_for(f: FindingSpec) -> np.ndarray | None:
        if f.region is None:
            return None
        region = np.asarray(f.region).astype(bool)
        if f.kind in ("cardiomegaly", "device"):
            return region
        return region & _disk_dilate(geo.lungs, max(1, int(round(0.015 * n))))

    allowed = [allowed_for(f) for f in findings]
    empty = np.zeros((n, n), bool)

    # structural changes first: they reshape the anatomy that everything else is drawn on
    for i, f in enumerate(findings):
        if allowed[i] is not None and not allowed[i].any():
            results[i] = (None, empty.copy())
        elif f.kind == "emphysema":
            results[i] = _emphysema(ctx, f, finding_rngs[i], allowed[i])
        elif f.kind == "cardiomegaly":
            ctr = 0.55 + 0.10 * f.severity
            ctx.ctr = max(ctx.ctr or 0.0, ctr)
    for i, f in enumerate(findings):
        if results[i] is None and f.kind == "pneumothorax":
            results[i] = _pneumothorax(ctx, f, finding_rngs[i], allowed[i])

    density, body = _anatomy(ctx, params, anatomy_rng)

    drawers = {
        "opacity": lambda c, f, r, a: _draw_airspace(c, f, r, a, consolidation=False),
        "consolidation": lambda c, f, r, a: _draw_airspace(c, f, r, a, consolidation=True),
        "atelectasis": _draw_atelectasis,
        "effusion": _draw_effusion,
        "nodule": lambda c, f, r, a: _draw_nodule(c, f, r, a, calcified=False),
        "granuloma": lambda c, f, r, a: _draw_nodule(c, f, r, a, calcified=True),
        "scar": _draw_scar,
        "edema": _draw_edema,
        "device": _draw_device,
    }
    for i, f in enumerate(findings):
        if results[i] is not None:
            continue
        if f.kind == "cardiomegaly":
            mask = ctx.heart.copy()
            if allowed[i] is not None:
                mask &= allowed[i]
            results[i] = (None, mask)
            continue
        delta, mask = drawers[f.kind](ctx, f, finding_rngs[i], allowed[i])
        if f.kind == "device" and allowed[i] is not None:
            mask &= allowed[i]
            if not mask.any():
                delta = None
        results[i] = (delta, mask)

    masks = []
    for f, (delta, mask) in zip(findings, results, strict=True):
        if delta is not None:
            density = density + delta * body
        mask = mask & body
        if f.region is not None:
            mask &= np.asarray(f.region).astype(bool)
        elif not mask.any():  # guarantee a location for every unpinned finding, even at 32 px
            mask = _fallback_mask(geo, f)
        masks.append(mask)

    image = _film(density, params, anatomy_rng, geo.px)
    return Radiograph(image=image, masks=masks, body=body)


def _fallback_mask(geo: _Geometry, f: FindingSpec) -> np.ndarray:
    mask = np.zeros((geo.n, geo.n), bool)
    for side in geo.sides(f.side):
        y, x = geo.side_info[side]["hilum"] if f.zone == "diffuse" else _zone_centre(geo, side, f.zone)
        mask[int(round(y)), int(round(x))] = True
    return mask


def _zone_centre(geo: _Geometry, side: str, zone: str) -> tuple[float, float]:
    zm = geo.zone_mask(side, zone)
    ys, xs = np.nonzero(zm if zm.any() else geo.lung[side])
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return float(ys[k]), float(xs[k])
