"""Deterministic synthetic macular OCT B-scans and volumes with layer ground truth.

Modelled: one eye is a smooth 3-D scene sampled on B-scans (lateral axis x across the
image width, slow axis y between B-scans, depth down the rows), so neighbouring
B-scans of a volume change smoothly:
  * a curved, slightly tilted retina (smooth random curvature of Bruch's membrane)
    with a foveal pit where the inner layers thin out and the ONL thickens, and a
    nasal RNFL that is thicker than the temporal one;
  * seven reflectivity bands with sub-bands: bright RNFL, GCL/IPL, dark INL with a
    brighter OPL, dark ONL, the ELM line, ellipsoid and interdigitation zones,
    the brightest RPE, then a textured choroid fading with depth;
  * retinal vessels in the GCL casting vertical shadows;
  * label 1 (macular oedema): dark ellipsoidal intraretinal cysts in the INL/OPL and
    ONL (3-D ellipsoids) that thicken those layers;
  * label 2 (AMD-like drusen): dome-shaped RPE elevations over sub-RPE material;
  * axial blur, multiplicative gamma speckle, additive noise, gain and gamma jitter.

Not modelled: vitreous/hyaloid, epiretinal membranes, subretinal fluid, pigment
epithelial detachments, geographic atrophy, vessel flow, axial-length/scan-pattern
optics, segmentation-style "real" artefacts (motion, mirror, blink). Drusen pixels
are part of class 6 (RPE/drusen complex) in the layer map. Numpy only;
``np.random.default_rng`` streams from the seed, never the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbone_med.data.phantom_fundus import check_choice, check_seed, check_size, interp_axis, streams
from fedbone_med.errors import DataError

OCT_LABELS = ("normal", "macular_edema", "drusen")
LAYER_CLASSES = ("background", "rnfl", "gcl_ipl", "inl_opl", "onl", "photoreceptors", "rpe", "choroid", "fluid")
FLUID_CLASS = 8
MAX_BSCANS = 1024
VOLUME_HALF_SPAN = 0.6  # a volume samples the slow axis over [-0.6, 0.6] (x spans [-1, 1])


@dataclass(frozen=True)
class OCTPhantom:
    """One synthetic B-scan and its ground truth (arrays (H, W))."""

    image: np.ndarray  # (H, W) float32 in [0, 1]
    layers: np.ndarray  # (H, W) uint8, see LAYER_CLASSES; fluid (8) overrides the layer
    fluid: np.ndarray  # (H, W) uint8 {0, 1}
    drusen: np.ndarray  # (H, W) uint8 {0, 1}
    label: int  # 0 normal, 1 macular oedema (fluid), 2 drusen (no fluid)
    edema: int  # 1 iff label == 1
    boundaries: np.ndarray | None = None  # (7, W) float32 rows of ILM, ..., RPE top, Bruch's membrane
    slice_position: float = 0.0  # slow-axis position y of this B-scan


@dataclass(frozen=True)
class _Eye:
    p: dict  # scalar parameters
    grid: np.ndarray  # (3, 6, 9) smooth-noise grids over (y, x)
    frac: np.ndarray  # (6,) layer fractions RNFL..RPE
    cysts: np.ndarray  # (K, 7) cx, cy, rx, ry, zpos, rz, swell
    drusen: np.ndarray  # (K, 4) cx, cy, r, h
    vessels: np.ndarray  # (K, 3) x, width, strength
    chor: np.ndarray  # (7, 9, 16) smooth noise over (y, depth, x) for choroidal vessels


def _chain(rng: np.random.Generator, k: int) -> tuple[np.ndarray, float]:
    """k slow-axis centres spread evenly over the volume span (so every B-scan hits one)."""
    spacing = 2 * VOLUME_HALF_SPAN / (k - 1)
    cy = np.linspace(-VOLUME_HALF_SPAN, VOLUME_HALF_SPAN, k) + rng.uniform(-0.1, 0.1, k) * spacing
    return cy, spacing


def _make_eye(g: np.random.Generator, g_les: np.random.Generator, label: int) -> _Eye:
    p = {
        "xf": g.uniform(-0.15, 0.15),
        "yf": g.uniform(-0.05, 0.05),
        "zbm": g.uniform(0.56, 0.66),
        "curv": g.uniform(-0.04, 0.12),
        "tilt": g.uniform(-0.05, 0.05),
        "tilt_y": g.uniform(-0.04, 0.04),
        "thick": g.uniform(0.32, 0.4),
        "pit_sigma": g.uniform(0.13, 0.19),
        "pit_depth": g.uniform(0.82, 0.95),
        "nasal": float(g.choice([-1.0, 1.0])),
        "k": g.uniform(6.0, 12.0),
        "sigma": g.uniform(0.01, 0.03),
        "gain": g.uniform(0.85, 1.1),
        "gamma": g.uniform(0.85, 1.15),
        "chor": g.uniform(0.06, 0.1),
    }
    frac = np.array([0.11, 0.25, 0.19, 0.23, 0.13, 0.09]) * g.uniform(0.9, 1.1, 6)
    grid = g.standard_normal((3, 6, 9))
    chor = g.standard_normal((7, 9, 16)).astype(np.float32)  # (y, depth, x) choroidal vessel texture
    nv = int(g.integers(3, 7))
    vessels = np.stack([g.uniform(-0.95, 0.95, nv), g.uniform(0.01, 0.025, nv), g.uniform(0.35, 0.6, nv)], 1)
    cysts, drusen = np.zeros((0, 7)), np.zeros((0, 4))
    if label == 1:
        k = int(g_les.integers(3, 8))
        cy, sp = _chain(g_les, k)
        cysts = np.stack(
            [
                np.clip(p["xf"] + g_les.normal(0, 0.15, k), -0.7, 0.7),
                cy,
                g_les.uniform(0.08, 0.2, k),
                sp * g_les.uniform(0.7, 0.95, k),
                g_les.uniform(0.35, 0.65, k),
                g_les.uniform(0.3, 0.45, k),
                g_les.uniform(0.6, 1.2, k),
            ],
            1,
        )
    elif label == 2:
        k = int(g_les.integers(4, 9))
        cy, sp = _chain(g_les, k)
        extra = int(g_les.integers(1, 5))  # the first extra druse sits near the foveal B-scan
        drusen = np.stack(
            [
                np.clip(p["xf"] + g_les.normal(0, 0.25, k + extra), -0.8, 0.8),
                np.concatenate([cy, [g_les.uniform(-0.1, 0.1)], g_les.uniform(-0.7, 0.7, extra - 1)]),
                np.concatenate([sp * g_les.uniform(0.7, 0.9, k), g_les.uniform(0.08, 0.18, extra)]),
                g_les.uniform(0.05, 0.09, k + extra),
            ],
            1,
        )
    return _Eye(p, grid, frac / frac.sum(), cysts, drusen, vessels, chor)


def _field(grid: np.ndarray, y: float, x: np.ndarray) -> np.ndarray:
    """Smooth noise grid (gy, gx) sampled at slow-axis y and lateral positions x (W,)."""
    gy = grid.shape[0]
    pos = np.clip((y + 1.0) / 2.0, 0.0, 1.0) * (gy - 1)
    i0 = min(int(pos), gy - 2)
    f = pos - i0
    f = f * f * (3 - 2 * f)
    row = grid[i0] * (1 - f) + grid[i0 + 1] * f  # (gx,)
    xp = np.clip((x + 1.0) / 2.0, 0.0, 1.0) * (len(row) - 1)
    return np.interp(xp, np.arange(len(row)), row)


def _ramp(z: np.ndarray, s: np.ndarray, soft: float) -> np.ndarray:
    return np.clip((z - s[None, :]) / soft + 0.5, 0.0, 1.0)


def _render(eye: _Eye, y: float, shape: tuple[int, int], label: int, rng: np.random.Generator) -> OCTPhantom:
    h, w = shape
    p = eye.p
    x = (np.arange(w) + 0.5) / w * 2.0 - 1.0  # (W,)
    z = (np.arange(h, dtype=np.float32) + 0.5)[:, None]  # (H, 1)
    g = np.exp(-((x - p["xf"]) ** 2 + (y - p["yf"]) ** 2) / (2 * p["pit_sigma"] ** 2))  # (W,)
    zbm = h * (
        p["zbm"]
        - 0.5 * p["curv"] * ((x - p["xf"]) ** 2 + 0.5 * y * y)
        + p["tilt"] * x
        + p["tilt_y"] * y
        + 0.012 * _field(eye.grid[0], y, x)
    )
    thick = (
        h * p["thick"] * (0.86 + 0.14 * np.exp(-(((x - p["xf"]) / 0.5) ** 2))) * (1 + 0.04 * _field(eye.grid[1], y, x))
    )
    t = thick[None, :] * eye.frac[:, None]  # (6, W) RNFL, GCL+IPL, INL+OPL, ONL, PR, RPE
    t[0] *= 0.55 + 0.9 / (1 + np.exp(-5 * p["nasal"] * (x - p["xf"])))
    t[:3] *= 1 - p["pit_depth"] * g
    t[3] *= 1 + 0.35 * g
    t[4] *= 1 + 0.2 * g
    # oedema: cyst cross-sections at this slow-axis position; they thicken INL/OPL and ONL
    cyst = []
    for cx, cy, rx, ry, zpos, rz, swell in eye.cysts:
        c = 1 - ((y - cy) / ry) ** 2
        if c > 0:
            a = rx * np.sqrt(c)
            cyst.append((cx, a, zpos, rz * (0.55 + 0.45 * np.sqrt(c))))
            prof = swell * c * np.exp(-(((x - cx) / (1.6 * a)) ** 2))
            t[2] *= 1 + 0.6 * prof
            t[3] *= 1 + prof
    # drusen: dome heights (pixels) at this position lift the RPE
    e = np.zeros(w)
    for cx, cy, r, hd in eye.drusen:
        q = 1 - ((x - cx) ** 2 + (y - cy) ** 2) / r**2
        e = np.maximum(e, max(hd * h, 3.0) * np.clip(q, 0, None))
    b = np.empty((7, w))
    b[6] = zbm
    for k in range(5, -1, -1):
        b[k] = b[k + 1] - t[k]
    b[:6] -= e[None, :] * np.array([0.03, 0.05, 0.15, 0.3, 0.6, 1.0])[:, None]
    rpe_bottom = b[6] - e
    b[:6] = np.minimum.accumulate(b[:6][::-1], axis=0)[::-1]  # keep boundaries ordered
    layers = (z[None] >= b[:, None, :].astype(np.float32)).sum(axis=0).astype(np.uint8)  # (H, W)
    drusen = (z >= rpe_bottom[None, :]) & (z < b[6][None, :]) & (e[None, :] > 0)

    fluid = np.zeros((h, w), bool)
    for cx, a, zpos, rz in cyst:
        j = int(np.clip((cx + 1) / 2 * w, 0, w - 1))
        band = b[4, j] - b[2, j]
        zc, hz, ax = b[2, j] + zpos * band, max(rz * band, 0.7), max(a * w / 2, 0.7)
        j0, j1 = max(int(j - ax - 1), 0), min(int(j + ax + 2), w)
        i0, i1 = max(int(zc - hz - 1), 0), min(int(zc + hz + 2), h)
        xx = (np.arange(j0, j1) + 0.5 - (cx + 1) / 2 * w) / ax
        zz = (np.arange(i0, i1) + 0.5 - zc) / hz
        fluid[i0:i1, j0:j1] |= xx[None, :] ** 2 + zz[:, None] ** 2 <= 1
    fluid &= (layers == 3) | (layers == 4)
    if label == 1 and not fluid.any() and cyst:  # guarantee: the label is honoured exactly
        cx, a, zpos, rz = max(cyst, key=lambda c: c[1])
        j = int(np.clip((cx + 1) / 2 * w, 0, w - 1))
        fluid[int(np.clip(b[2, j] + zpos * (b[4, j] - b[2, j]), 0, h - 1)), j] = True
    if label == 2 and not drusen.any():
        j = int(np.argmax(e))
        drusen[int(np.clip(b[6, j] - 0.5, 0, h - 1)), j] = True
        layers[int(np.clip(b[6, j] - 0.5, 0, h - 1)), j] = 6

    # reflectivity: smooth steps between (sub-)layer boundaries
    soft = max(0.6, 0.004 * h)
    tp = b[5] - b[4]
    steps = [
        (b[0], 0.85),
        (b[1], 0.45),
        (b[1] + 0.45 * (b[2] - b[1]), 0.6),
        (b[2], 0.25),
        (b[2] + 0.55 * (b[3] - b[2]), 0.5),
        (b[3], 0.12),
        (b[4], 0.6),
        (b[4] + 0.15 * tp, 0.28),
        (b[4] + 0.45 * tp, 0.85),
        (b[4] + 0.65 * tp, 0.38),
        (b[4] + 0.82 * tp, 0.65),
        (b[5], 1.0),
        (rpe_bottom, 0.5),
        (b[6], 0.45),
    ]
    img = np.full((h, w), 0.03, np.float32)
    prev = 0.03
    for s, val in steps:
        img += (val - prev) * _ramp(z, s.astype(np.float32), soft)
        prev = val
    gy = eye.chor.shape[0] - 1
    pos = np.clip((y + 1.0) / 2.0, 0.0, 1.0) * gy
    i0 = min(int(pos), gy - 1)
    plane = eye.chor[i0] + (eye.chor[i0 + 1] - eye.chor[i0]) * np.float32(pos - i0)
    tex = interp_axis(interp_axis(plane, h, 0), w, 1)  # (H, W)
    below = np.maximum(z - b[6][None, :], 0) / h
    chor = np.clip(0.9 + 0.65 * np.tanh(1.5 * tex), 0.12, 1.6) * np.exp(-below / p["chor"])
    img *= np.where(z > b[6][None, :], chor, 1.0).astype(np.float32)
    # vessels in the GCL: bright cross-sections casting shadows downwards
    zv_all = b[1] + 0.3 * (b[2] - b[1])
    shade = np.zeros(w)
    for xv, wv, st in eye.vessels:
        prof = np.exp(-(((x - xv) / wv) ** 2))
        shade = np.maximum(shade, st * prof)
        j = int(np.clip((xv + 1) / 2 * w, 0, w - 1))
        rv = max(wv * w / 2, 0.8)
        img += (0.35 * prof[None, :] * np.exp(-(((z - zv_all[j]) / rv) ** 2))).astype(np.float32)
    img *= (1.0 - shade[None, :] * _ramp(z, zv_all + 2.0, soft)).astype(np.float32)
    img[fluid] = 0.04
    img *= (1.0 + 0.08 * _field(eye.grid[2], y, x)).astype(np.float32)[None, :]
    img[1:-1] = 0.25 * img[:-2] + 0.5 * img[1:-1] + 0.25 * img[2:]  # axial point-spread
    # speckle: a smaller image averages more speckle grains per pixel (like a downsampled scan)
    k = p["k"] * max(1.0, 256.0 / np.sqrt(h * w))
    img *= rng.standard_gamma(k, (h, w), dtype=np.float32) / np.float32(k)
    img += rng.standard_normal((h, w), dtype=np.float32) * p["sigma"]
    img = np.clip(img * p["gain"], 0.0, 1.0) ** p["gamma"]
    layers[fluid] = FLUID_CLASS
    return OCTPhantom(
        image=img.astype(np.float32),
        layers=layers,
        fluid=fluid.astype(np.uint8),
        drusen=drusen.astype(np.uint8),
        label=label,
        edema=int(label == 1),
        boundaries=b.astype(np.float32),
        slice_position=float(y),
    )


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise DataError(f"OCT size must be an int or a (height, width) pair, got {len(size)} values")
        return check_size(size[0], "height"), check_size(size[1], "width")
    s = check_size(size)
    return s, s


def make_oct_volume(
    seed: int, n_bscans: int, size: int | tuple[int, int] = 64, label: int | None = None
) -> list[OCTPhantom]:
    """``n_bscans`` B-scans of one eye at slow-axis positions evenly spaced over
    [-VOLUME_HALF_SPAN, VOLUME_HALF_SPAN] (just 0.0, through the fovea, for one B-scan).

    Every B-scan carries the volume's label (drawn uniformly from 0..2 when None):
    cysts and drusen are spread along the slow axis so that each B-scan shows some.
    """
    seed, shape = check_seed(seed), _shape(size)
    label = check_choice(label, len(OCT_LABELS), "OCT label")
    if isinstance(n_bscans, bool) or not isinstance(n_bscans, (int, np.integer)) or not (1 <= n_bscans <= MAX_BSCANS):
        raise DataError(f"n_bscans must be an integer between 1 and {MAX_BSCANS}, got {n_bscans!r}")
    g_geo, g_label, g_les = streams(seed, 3)
    if label is None:
        label = int(g_label.integers(0, len(OCT_LABELS)))
    eye = _make_eye(g_geo, g_les, label)
    ys = np.linspace(-VOLUME_HALF_SPAN, VOLUME_HALF_SPAN, n_bscans) if n_bscans > 1 else np.zeros(1)
    return [
        _render(eye, float(y), shape, label, np.random.default_rng(np.random.SeedSequence([seed, 7, k])))
        for k, y in enumerate(ys)
    ]


def make_oct(seed: int, size: int | tuple[int, int] = 64, label: int | None = None) -> OCTPhantom:
    """One foveal B-scan; ``label`` None draws 0..2 uniformly, otherwise honoured exactly.

    ``size`` is the side of a square B-scan or a (height, width) pair; identical to
    ``make_oct_volume(seed, 1, size, label)[0]``.
    """
    return make_oct_volume(seed, 1, size, label)[0]


def make_oct_batch(
    seeds: list[int] | np.ndarray, size: int | tuple[int, int] = 64, labels: list[int | None] | None = None
) -> dict[str, np.ndarray]:
    """Stack B-scans: ``image`` (N, H, W) float32, ``layers``/``fluid``/``drusen`` (N, H, W) uint8,
    ``label``/``edema`` (N,) int64."""
    seeds = list(seeds)
    if labels is not None and len(labels) != len(seeds):
        raise DataError(f"got {len(labels)} labels for {len(seeds)} seeds; give one per seed or none")
    phs = [make_oct(s, size, None if labels is None else labels[i]) for i, s in enumerate(seeds)]
    out = {k: np.stack([getattr(p, k) for p in phs]) for k in ("image", "layers", "fluid", "drusen")}
    out["label"] = np.array([p.label for p in phs], np.int64)
    out["edema"] = np.array([p.edema for p in phs], np.int64)
    return out
