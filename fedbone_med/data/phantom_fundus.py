"""Deterministic synthetic colour fundus photographs with pixel-exact ground truth.

Modelled (all geometry in size-independent normalised coordinates, image width 2):
  * a circular field of view with radial vignetting, an orange-red background with
    low-frequency choroidal texture, a darker macula and fovea about 2.5 disc
    diameters temporal (and slightly inferior) to the optic disc;
  * a bright yellowish optic disc with a paler, softer-edged cup inside it;
  * a branching vessel tree: arteries and veins leave the disc as superior and
    inferior temporal arcades (elliptic arcs around the macula), nasal trunks and
    small papillomacular vessels, and branch twice with widths tapering and shrinking
    at every branch; vessels stop at the FOV edge and at the foveal avascular zone.
    Vessels are rasterised as anti-aliased tapered capsules (vectorised distance to
    each polyline segment inside its bounding box), darker and redder than the
    background, veins darker and wider than arteries;
  * diabetic-retinopathy lesions: microaneurysms (tiny dark red dots), dot/blot and
    flame haemorrhages, clustered hard exudates (bright yellow), cotton wool spots
    (pale, fuzzy) and, for grade 4, neovascular tufts (tortuous fine vessels with a
    faint fibrous haze) at the disc or along the arcades;
  * left/right eyes (a left eye is the mirror image), a small rotation, illumination
    gain, colour and gamma jitter, an illumination gradient and mild sensor noise.

Not modelled: lens/media opacities, camera artefacts (flare, eyelashes, dust),
glaucomatous cupping linked to any label, venous beading, IRMA, laser scars,
choroidal vessels, myopic changes, real optics. Grades follow a simplified rule,
see :func:`grade_from_counts`. Generators use only numpy and ``np.random.default_rng``
seeded from the ``seed`` argument (never the global RNG); the same seed always gives
identical arrays, and essentially the same scene at every size (only where two lesions
would share a pixel at a small size does one move to another candidate place).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbone_med.errors import DataError

MIN_SIZE = 16
MAX_SIZE = 2048
N_GRADES = 5
SEVERE_HAEMORRHAGES = 10  # this many haemorrhages (and no neovascularisation) -> grade 3
LESION_CLASSES = ("none", "microaneurysm", "haemorrhage", "hard_exudate", "soft_exudate")


@dataclass(frozen=True)
class FundusPhantom:
    """One synthetic fundus photograph and its ground truth (all arrays (H, W) unless noted)."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1], RGB, 0 outside the FOV
    fov: np.ndarray  # (H, W) bool
    vessels: np.ndarray  # (H, W) uint8 {0, 1}, includes neovascular vessels
    disc: np.ndarray  # (H, W) uint8 {0, 1}
    cup: np.ndarray  # (H, W) uint8 {0, 1}, subset of disc
    lesions: np.ndarray  # (H, W) uint8 class map, see LESION_CLASSES
    grade: int  # DR grade 0..4, = grade_from_counts(*lesion_counts)
    macular_edema: int  # 1 iff a hard-exudate pixel lies within 1 disc diameter of the fovea
    laterality: str = "R"  # "R" or "L" (a left eye is mirrored)
    lesion_counts: tuple[int, ...] = (0, 0, 0, 0, 0)  # MA, haemorrhages, HE clusters, CWS, NV tufts
    neovascular: np.ndarray | None = None  # (H, W) uint8 {0, 1} neovascular tufts
    disc_center: tuple[float, float] = (0.0, 0.0)  # (row, col) in pixels
    fovea_center: tuple[float, float] = (0.0, 0.0)  # (row, col) in pixels
    disc_diameter: float = 0.0  # in pixels (horizontal)


def grade_from_counts(
    microaneurysms: int,
    haemorrhages: int,
    hard_exudates: int,
    soft_exudates: int,
    neovascular: int,
) -> int:
    """Simplified ICDR diabetic-retinopathy grade from lesion counts.

    4 (proliferative) if any neovascular tuft; else 3 (severe) if at least
    ``SEVERE_HAEMORRHAGES`` haemorrhages; else 2 (moderate) if any haemorrhage, hard
    exudate cluster or cotton wool spot; else 1 (mild) if any microaneurysm; else 0.
    """
    if neovascular > 0:
        return 4
    if haemorrhages >= SEVERE_HAEMORRHAGES:
        return 3
    if haemorrhages + hard_exudates + soft_exudates > 0:
        return 2
    return 1 if microaneurysms > 0 else 0


# --------------------------------------------------------------------------- validation
def check_seed(seed: object) -> int:
    """Return ``seed`` as an int or raise DataError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"phantom seed must be a non-negative integer, got {type(seed).__name__}")
    if seed < 0:
        raise DataError(f"phantom seed must be a non-negative integer, got {int(seed)}")
    return int(seed)


def check_size(size: object, what: str = "size") -> int:
    """Return an image side length as an int in [MIN_SIZE, MAX_SIZE] or raise DataError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise DataError(f"phantom {what} must be an integer, got {type(size).__name__}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"phantom {what} must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {int(size)}")
    return int(size)


def check_choice(value: object, n: int, what: str) -> int | None:
    """Validate an optional class index in [0, n) (``None`` passes through)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise DataError(f"phantom {what} must be None or an integer 0..{n - 1}, got {value!r}")
    return int(value)


def streams(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators derived from ``seed`` (stable across numpy versions)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


# --------------------------------------------------------------------------- rendering helpers
def interp_axis(grid: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Smoothstep-interpolate ``grid`` along ``axis`` to ``n`` samples spanning it."""
    g = grid.shape[axis]
    pos = (np.arange(n, dtype=np.float32) + 0.5) * ((g - 1) / n)
    i0 = np.minimum(pos.astype(np.int64), g - 2)
    f = pos - i0
    f = f * f * (3.0 - 2.0 * f)
    shape = [1] * grid.ndim
    shape[axis] = n
    a = np.take(grid, i0, axis=axis)
    return a + (np.take(grid, i0 + 1, axis=axis) - a) * f.reshape(shape)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean unit-ish smooth value noise (H, W) float32; draws depend on ``cells`` only."""
    grid = rng.standard_normal((cells[0] + 1, cells[1] + 1)).astype(np.float32)
    return interp_axis(interp_axis(grid, shape[0], 0), shape[1], 1)


def _scatter_max(out: np.ndarray, idx: np.ndarray, val: np.ndarray) -> None:
    keep = val > 0
    np.maximum.at(out, idx[keep], val[keep])


_BUCKETS = np.array([2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256])


def _buckets(k: np.ndarray) -> np.ndarray:
    """Round box sides up to a few values so boxes can be batched."""
    i = np.searchsorted(_BUCKETS, k)
    return np.where(i < len(_BUCKETS), _BUCKETS[np.minimum(i, len(_BUCKETS) - 1)], k)


def raster_segments(seg: np.ndarray, shape: tuple[int, int], layers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased alpha (L, H, W) float32 and mask (L, H, W) bool of tapered capsules.

    ``seg`` is (M, 9): x0, y0, x1, y1, w0, w1 in pixels (pixel (i, j) has centre
    (j + 0.5, i + 0.5)), contrast, in_mask, layer. Coverage is >= 0.5 exactly where a
    pixel centre lies within half the local width and falls to 0 half a pixel further
    out; alpha is the max over a layer's segments of coverage * contrast, and the mask
    holds the pixels with coverage >= 0.5 of segments whose in_mask is 1.
    """
    h, w = shape
    out = np.zeros(layers * h * w, np.float32)
    mask = np.zeros(layers * h * w, bool)
    x0, y0, x1, y1, w0, w1, con, inm = seg[:, :8].astype(np.float32).T
    base = seg[:, 8].astype(np.int64) * (h * w)
    half = np.maximum(w0, w1) / 2 + 0.5
    lox = np.floor(np.minimum(x0, x1) - half).astype(np.int64)
    loy = np.floor(np.minimum(y0, y1) - half).astype(np.int64)
    kx = np.floor(np.maximum(x0, x1) + half).astype(np.int64) - lox + 1
    ky = np.floor(np.maximum(y0, y1) + half).astype(np.int64) - loy + 1
    bucket = _buckets(np.maximum(kx, ky))
    for k in np.unique(bucket):
        s = bucket == k
        off = np.arange(k)
        px = lox[s, None, None] + off[None, None, :]  # (M, 1, K)
        py = loy[s, None, None] + off[None, :, None]  # (M, K, 1)
        dx, dy = (x1 - x0)[s, None, None], (y1 - y0)[s, None, None]
        cx, cy = px + 0.5 - x0[s, None, None], py + 0.5 - y0[s, None, None]
        t = np.minimum(np.maximum((cx * dx + cy * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0.0), 1.0)
        ex, ey = cx - t * dx, cy - t * dy
        wid = w0[s, None, None] + t * (w1 - w0)[s, None, None]
        cov = np.minimum(wid / 2 + 0.5 - np.sqrt(ex * ex + ey * ey), 1.0)  # (M, K, K)
        cov = np.where((px >= 0) & (px < w) & (py >= 0) & (py < h), cov, 0.0).ravel()
        idx = (np.clip(py, 0, h - 1) * w + np.clip(px, 0, w - 1) + base[s, None, None]).ravel()
        _scatter_max(out, idx, cov * np.repeat(con[s], k * k))
        mask[idx[(cov >= 0.5) & (np.repeat(inm[s], k * k) > 0)]] = True
    return out.reshape(layers, h, w), mask.reshape(layers, h, w)


def raster_ellipses(ell: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Max-composited alpha (H, W) float32 of soft ellipses.

    ``ell`` is (M, 6): cx, cy, rx, ry, angle, soft (pixels, radians). Alpha is 0.5 on
    the ellipse outline, 1 inside by ~``soft`` pixels and 0 outside by ~``soft``.
    """
    h, w = shape
    out = np.zeros(h * w, np.float32)
    if len(ell) == 0:
        return out.reshape(shape)
    cx, cy, rx, ry, ang, soft = ell.T
    rx, ry, soft = np.maximum(rx, 0.3), np.maximum(ry, 0.3), np.maximum(soft, 0.35)
    half = np.maximum(rx, ry) + 2 * soft + 1
    lox, loy = np.floor(cx - half).astype(np.int64), np.floor(cy - half).astype(np.int64)
    bucket = _buckets(np.ceil(2 * half + 2).astype(np.int64))
    cos, sin = np.cos(ang), np.sin(ang)
    for k in np.unique(bucket):
        s = bucket == k
        off = np.arange(k)
        px = lox[s, None, None] + off[None, None, :]  # (M, 1, K)
        py = loy[s, None, None] + off[None, :, None]  # (M, K, 1)
        ex, ey = px + 0.5 - cx[s, None, None], py + 0.5 - cy[s, None, None]
        c, sn = cos[s, None, None], sin[s, None, None]
        u, v = (ex * c + ey * sn) / rx[s, None, None], (ey * c - ex * sn) / ry[s, None, None]
        sd = (np.sqrt(u * u + v * v) - 1.0) * np.minimum(rx, ry)[s, None, None]
        alpha = np.clip(0.5 - sd / (2 * soft[s, None, None]), 0.0, 1.0)
        ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        alpha = np.where(ok, alpha, 0.0).astype(np.float32)
        _scatter_max(out, (np.clip(py, 0, h - 1) * w + np.clip(px, 0, w - 1)).ravel(), alpha.ravel())
    return out.reshape(shape)


def random_walks(
    rng: np.random.Generator, start: np.ndarray, angle: np.ndarray, length: np.ndarray, n: int, curl: float
) -> np.ndarray:
    """(B, n, 2) smooth random-walk polylines from ``start`` (B, 2) with heading ``angle``."""
    b = len(start)
    step = (length / (n - 1))[:, None]
    turn = rng.normal(0.0, curl, (b, n - 1)) * np.sqrt(step * 20.0)
    theta = angle[:, None] + np.cumsum(turn, axis=1) - turn / 2  # (B, n-1)
    d = np.stack([np.cos(theta), np.sin(theta)], axis=-1) * step[..., None]
    return np.concatenate([start[:, None, :], start[:, None, :] + np.cumsum(d, axis=1)], axis=1)


# --------------------------------------------------------------------------- scene geometry
Level = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # points (B, n, 2), widths, valid, is_vein (B,)


def _rotate(p: np.ndarray, ang: float) -> np.ndarray:
    c, s = np.cos(ang), np.sin(ang)
    return np.stack([c * p[..., 0] - s * p[..., 1], s * p[..., 0] + c * p[..., 1]], axis=-1)


def _keep(pts: np.ndarray, fov_r: float, fovea: np.ndarray, faz_r: float) -> np.ndarray:
    """(B, n) validity: a polyline stops for good at the FOV edge or the avascular zone."""
    bad = np.hypot(pts[..., 0], pts[..., 1]) > fov_r - 0.015
    bad |= np.hypot(pts[..., 0] - fovea[0], pts[..., 1] - fovea[1]) < faz_r
    return ~np.logical_or.accumulate(bad, axis=1)


def _children(
    rng: np.random.Generator,
    pts: np.ndarray,
    wid: np.ndarray,
    ok: np.ndarray,
    vein: np.ndarray,
    m: int,
    n: int,
    length: tuple[float, float],
    curl: float,
) -> Level:
    """``m`` random-walk branches of ``n`` points from each polyline of a level."""
    b, np_ = pts.shape[:2]
    ii = (rng.uniform(0.1, 0.92, b * m) * (np_ - 1)).astype(np.int64)
    rows = np.repeat(np.arange(b), m)
    tan = pts[rows, np.minimum(ii + 1, np_ - 1)] - pts[rows, np.maximum(ii - 1, 0)]
    side = rng.integers(0, 2, b * m) * 2 - 1
    ang = np.arctan2(tan[:, 1], tan[:, 0]) + side * rng.uniform(0.45, 1.15, b * m)
    cp = random_walks(rng, pts[rows, ii], ang, rng.uniform(*length, b * m), n, curl)
    w0 = wid[rows, ii] * rng.uniform(0.5, 0.72, b * m)
    cw = w0[:, None] * (1.0 - 0.55 * np.linspace(0.0, 1.0, n))
    return cp, cw, ok[rows, ii], vein[rows]


def _vessel_tree(
    rng: np.random.Generator, disc: np.ndarray, fovea: np.ndarray, r_d: float, fov_r: float
) -> tuple[list[Level], np.ndarray]:
    """Polylines per level: list of (pts (B, n, 2), widths (B, n), valid (B, n), is_vein (B,))."""
    n0 = 48
    faz_r = rng.uniform(0.3, 0.45) * r_d
    s = np.linspace(0.0, 1.0, n0)
    # temporal arcades: elliptic arcs around the macula (artery sup/inf, vein sup/inf)
    a = abs(disc[0] - fovea[0]) * rng.uniform(1.0, 1.25, 4)
    b = rng.uniform(0.33, 0.46, 4)
    th = s[None, :] * rng.uniform(2.2, 2.7, 4)[:, None]  # (4, n0)
    sign = np.array([-1.0, 1.0, -1.0, 1.0])[:, None]
    tx, ty = -a[:, None] * np.sin(th), sign * b[:, None] * np.cos(th)
    norm = np.hypot(tx, ty) + 1e-9
    wig = interp_axis(rng.normal(0.0, 0.03, (4, 9)), n0, 1) * s
    arc = np.stack(
        [
            disc[0] - a[:, None] + a[:, None] * np.cos(th) - ty / norm * wig,
            disc[1] + sign * b[:, None] * np.sin(th) + tx / norm * wig,
        ],
        axis=-1,
    )
    # nasal trunks (artery sup/inf, vein sup/inf) and two small papillomacular vessels
    nasal_ang = np.array([-1.0, 1.0, -1.0, 1.0]) * rng.uniform(0.7, 1.35, 4)
    mac_ang = np.pi + np.array([-1.0, 1.0]) * rng.uniform(0.05, 0.3, 2)
    starts = np.asarray(disc)[None, :] + rng.normal(0.0, 0.12 * r_d, (6, 2))
    length = np.concatenate([rng.uniform(0.6, 0.95, 4), [abs(disc[0] - fovea[0])] * 2])
    walks = random_walks(rng, starts, np.concatenate([nasal_ang, mac_ang]), length, n0, 0.22)
    pts = np.concatenate([arc + rng.normal(0.0, 0.1 * r_d, (4, 1, 2)), walks])  # (10, n0, 2)
    wv = rng.uniform(0.028, 0.034)
    wa = wv * rng.uniform(0.72, 0.82)
    w0 = np.array([wa, wa, wv, wv, 0.85 * wa, 0.85 * wa, 0.85 * wv, 0.85 * wv, 0.45 * wa, 0.45 * wv])
    wid = w0[:, None] * (1.0 - 0.5 * s)
    vein = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0, 1], dtype=bool)
    ok = _keep(pts, fov_r, fovea, faz_r) & (np.hypot(*(pts - disc).transpose(2, 0, 1)) > 0.3 * r_d)
    levels = [(pts, wid, ok, vein)]
    for m, n, lng in ((4, 20, (0.18, 0.42)), (3, 12, (0.08, 0.22))):
        cp, cw, cok, cvein = _children(rng, *levels[-1], m, n, lng, 0.3)
        levels.append((cp, cw, _keep(cp, fov_r, fovea, faz_r) & cok[:, None], cvein))
    return levels, arc


def _segments(levels: list[Level], rot: float, scale: float) -> np.ndarray:
    """(M, 9) pixel segments for :func:`raster_segments`, layer 0 arteries, 1 veins."""
    out = []
    for pts, wid, ok, is_vein in levels:
        n = pts.shape[1]
        step_px = np.hypot(*(pts[:, 1] - pts[:, 0]).T).mean() * scale
        keep = np.unique(np.r_[np.arange(0, n, max(1, int(1.5 / max(step_px, 1e-6)))), n - 1])
        p, w, v = _rotate(pts[:, keep], rot), wid[:, keep], ok[:, keep]
        lay = np.broadcast_to(is_vein[:, None, None], (len(p), len(keep) - 1, 1))
        seg = np.concatenate([p[:, :-1], p[:, 1:], w[:, :-1, None], w[:, 1:, None], lay], axis=-1)
        out.append(seg[v[:, :-1] & v[:, 1:]])
    seg = np.concatenate(out)
    return _visible(seg, scale)


def _visible(seg: np.ndarray, scale: float) -> np.ndarray:
    """(M, 7) normalised segments x0, y0, x1, y1, w0, w1, layer -> (M, 9) in pixels.

    A vessel thinner than a pixel is drawn wider and fainter (partial volume, softened
    to ``(w / drawn) ** 0.75`` so that small images keep a learnable signal), at least
    1 px wide from 1/3 px up so that it stays connected; vessels under 0.3 px are
    drawn but left out of the vessel mask.
    """
    w = seg[:, 4:6] * scale
    wr = np.maximum(w, np.minimum(1.0, 3.0 * w))
    con = ((w / np.maximum(wr, 1e-6)) ** 0.75).mean(axis=1, keepdims=True)
    inm = w.mean(axis=1, keepdims=True) >= 0.3
    return np.concatenate([(seg[:, :4] + 1.0) * scale, wr, con, inm, seg[:, 6:7]], axis=1)


# --------------------------------------------------------------------------- lesions
_COUNT_RANGES = {  # grade -> (MA, haemorrhage, hard-exudate clusters, CWS, NV) inclusive ranges
    0: ((0, 0), (0, 0), (0, 0), (0, 0), (0, 0)),
    1: ((1, 6), (0, 0), (0, 0), (0, 0), (0, 0)),
    2: ((2, 12), (1, SEVERE_HAEMORRHAGES - 1), (0, 4), (0, 2), (0, 0)),
    3: ((4, 16), (SEVERE_HAEMORRHAGES, 18), (0, 5), (1, 4), (0, 0)),
    4: ((3, 14), (3, 16), (0, 4), (0, 3), (1, 3)),
}


def _counts(rng: np.random.Generator, grade: int) -> tuple[int, ...]:
    counts = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in _COUNT_RANGES[grade])
    if grade_from_counts(*counts) != grade:  # cannot happen with the table above
        raise DataError(f"internal error: lesion counts do not give DR grade {grade}")
    return counts


class _Placer:
    """Greedy lesion placement with one distinct centre pixel per lesion."""

    def __init__(
        self, rng: np.random.Generator, size: int, disc: np.ndarray, r_d: float, fov_r: float, rot: float
    ) -> None:
        self.size, self.disc, self.r_d, self.rot = size, np.asarray(disc), r_d, rot
        self.rmax = 0.82 * fov_r
        self.used: set[int] = set()
        ang, rad = rng.uniform(0, 2 * np.pi, 400), self.rmax * np.sqrt(rng.uniform(0, 1, 400))
        self.fallback = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)

    def pick(self, cand: np.ndarray, n: int) -> np.ndarray:
        """Indices into ``cand`` (then into the fallback, offset by len(cand)) of n lesions."""
        if n == 0:
            return np.zeros(0, np.int64)
        allp = np.concatenate([cand, self.fallback])
        ok = np.hypot(allp[:, 0], allp[:, 1]) <= self.rmax
        ok &= np.hypot(*(allp - self.disc).T) > 1.4 * self.r_d
        pix = np.floor((_rotate(allp, self.rot) + 1.0) * (self.size / 2)).astype(np.int64)
        pix = np.clip(pix, 0, self.size - 1)
        keys = (pix[:, 1] * self.size + pix[:, 0]).tolist()
        chosen: list[int] = []
        for i in np.flatnonzero(ok).tolist():
            if keys[i] not in self.used:
                self.used.add(keys[i])
                chosen.append(i)
                if len(chosen) == n:
                    return np.array(chosen, np.int64)
        raise DataError(f"image of {self.size} px is too small for {n} separate lesions")


def _lesion_geometry(
    rng: np.random.Generator,
    counts: tuple[int, ...],
    disc: np.ndarray,
    fovea: np.ndarray,
    r_d: float,
    arc: np.ndarray,
    placer: _Placer,
) -> dict[str, tuple]:
    """Per class: (centres (n, 2), ellipses (m, 6) in normalised units, soft fraction)."""
    dd = 2 * r_d
    n_ma, n_hem, n_he, n_cws, n_nv = counts
    pole = (np.asarray(disc) + np.asarray(fovea)) / 2
    valid_arc = arc[:, 3:40].reshape(-1, 2)
    out: dict[str, tuple] = {}

    def blobs(cent: np.ndarray, r: np.ndarray, aspect: np.ndarray | float, radial_angle: bool) -> np.ndarray:
        ang = np.arctan2(cent[:, 1] - disc[1], cent[:, 0] - disc[0]) if radial_angle else 0 * r
        return np.stack([cent[:, 0], cent[:, 1], r * aspect, r, ang + rng.uniform(-0.3, 0.3, len(r)), r * 0], 1)

    def place(cand: np.ndarray, n: int) -> np.ndarray:
        idx = placer.pick(cand, n)
        return np.concatenate([cand, placer.fallback])[idx]

    cand = pole + rng.normal(0, 0.38, (4 * n_ma + 8, 2))
    c = place(cand, n_ma)
    out["ma"] = (c, blobs(c, rng.uniform(0.007, 0.013, n_ma), 1.0, False), 0.1)
    cand = pole + rng.normal(0, 0.42, (4 * n_hem + 8, 2))
    c = place(cand, n_hem)
    flame = rng.uniform(0, 1, n_hem) < 0.4
    aspect = np.where(flame, rng.uniform(1.8, 2.8, n_hem), rng.uniform(1.0, 1.3, n_hem))
    main = blobs(c, rng.uniform(0.016, 0.034, n_hem), aspect, True)
    # two smaller satellite blobs per haemorrhage make blot outlines irregular
    sat = np.repeat(main, 2, axis=0)
    sat[:, :2] += rng.normal(0, 0.45, (2 * n_hem, 2)) * sat[:, 3:4]
    sat[:, 2:4] *= rng.uniform(0.45, 0.75, (2 * n_hem, 1))
    out["hem"] = (c, np.concatenate([main, sat]), 0.4)
    # hard exudates: clusters, each either within ~0.3-0.85 DD of the fovea or >1.35 DD away
    macular = rng.uniform(0, 1, 4 * n_he + 8) < 0.5
    ang, rad = rng.uniform(0, 2 * np.pi, len(macular)), rng.uniform(0.3, 0.85, len(macular)) * dd
    near = np.asarray(fovea) + np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    far = pole + rng.normal(0, 0.4, near.shape)
    far_ok = np.hypot(*(far - fovea).T) > 1.35 * dd
    cand = np.where((macular | ~far_ok)[:, None], near, far)
    c = place(cand, n_he)
    ndots = rng.integers(3, 10, n_he)
    spread = rng.uniform(0.015, 0.045, n_he)
    dots = c[:, None, :] + rng.normal(0, 1, (n_he, 9, 2)) * spread[:, None, None]
    dots[:, 0] = c
    dots = dots[np.arange(9)[None, :] < ndots[:, None]]
    out["he"] = (c, blobs(dots, rng.uniform(0.006, 0.015, len(dots)), 1.0, False), 0.1)
    cand = valid_arc[rng.integers(0, len(valid_arc), 4 * n_cws + 8)] + rng.normal(0, 0.05, (4 * n_cws + 8, 2))
    c = place(cand, n_cws)
    out["cws"] = (c, blobs(c, rng.uniform(0.028, 0.05, n_cws), rng.uniform(1.2, 1.9, n_cws), True), 0.6)
    # neovascular tufts at the disc margin (NVD) or along the arcades (NVE)
    nvd = rng.uniform(0, 1, 4 * n_nv + 8) < 0.5
    ang = rng.uniform(0, 2 * np.pi, len(nvd))
    at_disc = np.asarray(disc) + (r_d * rng.uniform(1.45, 1.8, len(nvd)))[:, None] * np.stack(
        [np.cos(ang), np.sin(ang)], 1
    )
    cand = np.where(nvd[:, None], at_disc, valid_arc[rng.integers(0, len(valid_arc), len(nvd))])
    c = place(cand, n_nv)
    loops = 9
    start = np.repeat(c, loops, axis=0)
    walks = random_walks(
        rng, start, rng.uniform(0, 2 * np.pi, len(start)), rng.uniform(0.05, 0.11, len(start)), 10, 1.6
    )
    wid = np.repeat(rng.uniform(0.011, 0.016, n_nv), loops)[:, None] * np.ones(10)
    out["nv"] = (c, walks, wid, blobs(c, rng.uniform(0.05, 0.08, n_nv), 1.0, False))
    return out


# --------------------------------------------------------------------------- composition
def _ellipse_rho(u: np.ndarray, v: np.ndarray, c: np.ndarray, rx: float, ry: float, ang: float) -> np.ndarray:
    du, dv = u - float(c[0]), v - float(c[1])
    cs, sn = float(np.cos(ang)), float(np.sin(ang))
    return np.sqrt(((du * cs + dv * sn) / rx) ** 2 + ((dv * cs - du * sn) / ry) ** 2)


def _blend(img: np.ndarray, alpha: np.ndarray, colour: tuple[float, ...], base: np.ndarray | None = None) -> None:
    """In place: img += (base * colour - img) * alpha, only where alpha > 0.

    ``img`` (H, W, 3); ``alpha`` (H, W); ``base`` None (absolute colour), (H, W) or (H, W, 3).
    """
    m = alpha > 0
    col = np.asarray(colour, np.float32)
    tgt = col if base is None else (base[m] if base.ndim == 3 else base[m][:, None]) * col
    img[m] += (tgt - img[m]) * alpha[m][:, None]


def make_fundus(seed: int, size: int = 64, grade: int | None = None) -> FundusPhantom:
    """Synthetic fundus photograph, deterministic in ``seed``.

    ``grade=None`` draws the DR grade uniformly from 0..4; otherwise lesions are
    generated so that :func:`grade_from_counts` gives exactly ``grade``. Generating
    with the grade that ``grade=None`` drew gives the identical phantom.
    """
    seed, size = check_seed(seed), check_size(size)
    grade = check_choice(grade, N_GRADES, "DR grade")
    g_geo, g_grade, g_les, g_tex, g_noise = streams(seed, 5)
    if grade is None:
        grade = int(g_grade.integers(0, N_GRADES))
    scale = size / 2.0
    shape = (size, size)
    # anatomy in a right-eye frame, normalised units (image width 2, y down)
    fov_r = g_geo.uniform(0.9, 0.97)
    left = bool(g_geo.uniform() < 0.5)
    rot = g_geo.uniform(-0.14, 0.14)
    r_d = g_geo.uniform(0.12, 0.145)
    disc = np.array([g_geo.uniform(0.3, 0.38), g_geo.uniform(-0.08, 0.08)])
    fovea = disc + np.array([-2.5 * 2 * r_d * g_geo.uniform(0.92, 1.08), g_geo.uniform(0.1, 0.35) * r_d])
    disc_ry = r_d * g_geo.uniform(1.03, 1.15)
    cdr = g_geo.uniform(0.25, 0.6)
    cup = disc + np.array([-g_geo.uniform(0.0, 0.1) * r_d, g_geo.uniform(-0.05, 0.05) * r_d])
    levels, arc = _vessel_tree(g_geo, disc, fovea, r_d, fov_r)
    counts = _counts(g_les, grade)
    placer = _Placer(g_les, size, disc, r_d, fov_r, rot)
    geo = _lesion_geometry(g_les, counts, disc, fovea, r_d, arc, placer)
    disc_p, fovea_p, cup_p = _rotate(disc, rot), _rotate(fovea, rot), _rotate(cup, rot)

    c = (np.arange(size, dtype=np.float32) + 0.5) / scale - 1.0
    u, v = c[None, :], c[:, None]  # (1, W), (H, 1)
    r2 = u * u + v * v  # (H, W)
    fov = r2 <= fov_r * fov_r
    d_f2 = (u - float(fovea_p[0])) ** 2 + (v - float(fovea_p[1])) ** 2  # (H, W)
    rho_d = _ellipse_rho(u, v, disc_p, r_d, disc_ry, rot)
    rho_c = _ellipse_rho(u, v, cup_p, cdr * r_d, cdr * disc_ry, rot)
    disc_m = (rho_d <= 1.0) & fov
    cup_m = (rho_c <= 1.0) & disc_m
    for centre, targets in ((disc_p, (disc_m,)), (cup_p, (disc_m, cup_m))):  # >= 1 pixel even when tiny
        j, i = np.clip(np.floor((centre + 1.0) * scale).astype(np.int64), 0, size - 1)
        for m in targets:
            m[i, j] = True

    # background: orange-red, choroidal texture, vignetting, darker macula and fovea
    base = g_tex.uniform(0.75, 0.92) * np.array([1.0, g_tex.uniform(0.36, 0.5), g_tex.uniform(0.1, 0.22)], np.float32)
    tex = 1.0 + 0.045 * smooth_noise(g_tex, shape, (6, 6)) + 0.03 * smooth_noise(g_tex, shape, (20, 20))
    vign = 1.0 - g_tex.uniform(0.3, 0.5) * (r2 / fov_r**2) ** 2
    dd = 2 * r_d
    mac = np.exp(-d_f2 / (2 * (g_tex.uniform(0.5, 0.7) * dd) ** 2))
    spot = np.exp(-d_f2 / (2 * (0.12 * dd) ** 2))
    mac_col = np.array([0.36, 0.5, 0.36], np.float32) * g_tex.uniform(0.8, 1.15)
    dark = 1.0 - mac[..., None] * mac_col - spot[..., None] * np.array([0.08, 0.12, 0.08], np.float32)
    bg = base * (tex * vign)[..., None] * dark  # (H, W, 3) float32

    # optic disc and cup
    r_px = r_d * scale
    a_disc = np.clip(0.5 - (rho_d - 1.0) * r_px / (2 * max(0.5, 0.06 * r_px)), 0, 1)
    a_cup = np.clip(0.5 - (rho_c - 1.0) * cdr * r_px / (2 * max(0.6, 0.25 * cdr * r_px)), 0, 1)
    img = bg.copy()
    _blend(
        img,
        a_disc,
        tuple(np.array([0.98, 0.74, 0.5]) * g_tex.uniform(0.92, 1.05)),
        0.86 + 0.14 * np.clip(1.0 - rho_d, 0, 1),
    )
    _blend(img, 0.9 * a_cup, (1.0, 0.94, 0.8))

    # lesions: masks from alpha >= 0.5 plus one forced centre pixel per lesion
    def alpha_of(key: str) -> tuple[np.ndarray, np.ndarray]:
        cent, ell = geo[key][0], geo[key][1].copy()
        ell[:, :2] = _rotate(ell[:, :2], rot)
        ell[:, :4] = ell[:, :4] * scale
        ell[:, :2] += scale
        ell[:, 4] += rot
        ell[:, 5] = np.maximum(0.5, geo[key][2] * np.minimum(ell[:, 2], ell[:, 3]))
        pix = np.clip(np.floor((_rotate(cent, rot) + 1.0) * scale).astype(np.int64), 0, size - 1)
        alpha = raster_ellipses(ell, shape)
        alpha[pix[:, 1], pix[:, 0]] = np.maximum(alpha[pix[:, 1], pix[:, 0]], 0.6)
        return alpha, pix

    lesions = np.zeros(shape, np.uint8)
    centres = []
    nv_cent, walks, nv_w, haze = geo["nv"]
    geo["haze"] = (nv_cent, haze, 0.8)
    # superficial, semi-transparent findings first (vessels stay visible through them)
    for key, cls, target, base, opacity in (
        ("haze", 0, (0.86, 0.72, 0.6), vign, 0.35),
        ("cws", 4, (0.92, 0.84, 0.72), vign, 0.7),
    ):
        if len(geo[key][0]):
            alpha, pix = alpha_of(key)
            _blend(img, opacity * alpha, target, base)
            if cls:
                lesions[alpha >= 0.5] = cls
                centres.append((cls, pix))

    # vessels (arteries, veins, neovascular tufts): darker and redder than the background
    nv_seg = np.concatenate(
        [
            _rotate(walks[:, :-1], rot),
            _rotate(walks[:, 1:], rot),
            nv_w[:, :-1, None],
            nv_w[:, 1:, None],
            np.full(nv_w[:, 1:, None].shape, 2.0),
        ],
        axis=-1,
    )
    seg = np.concatenate([_segments(levels, rot, scale), _visible(nv_seg.reshape(-1, 7), scale)])
    (cov_a, cov_v, cov_nv), (ves_a, ves_v, neo) = raster_segments(seg, shape, 3)
    nv_pix = np.clip(np.floor((_rotate(nv_cent, rot) + 1.0) * scale).astype(np.int64), 0, size - 1)
    cov_nv[nv_pix[:, 1], nv_pix[:, 0]] = np.maximum(cov_nv[nv_pix[:, 1], nv_pix[:, 0]], 0.6)
    neo[nv_pix[:, 1], nv_pix[:, 0]] = True
    _blend(img, cov_a * g_tex.uniform(0.9, 1.0), (0.82, 0.5, 0.56), bg)
    _blend(img, cov_v * g_tex.uniform(0.9, 1.0), (0.6, 0.28, 0.38), bg)
    _blend(img, 0.9 * cov_nv, (0.66, 0.36, 0.42), bg)
    vessels = ves_a | ves_v | neo

    # intraretinal lesions over the vessels
    for key, cls, target, base in (
        ("hem", 2, (0.5, 0.17, 0.2), bg),
        ("ma", 1, (0.45, 0.14, 0.18), bg),
        ("he", 3, (0.98, 0.9, 0.42), 0.6 + 0.4 * vign),
    ):
        if len(geo[key][0]):
            alpha, pix = alpha_of(key)
            _blend(img, alpha, target, base)
            lesions[alpha >= 0.5] = cls
            centres.append((cls, pix))
    for cls, pix in centres:
        lesions[pix[:, 1], pix[:, 0]] = cls

    # acquisition: gain, colour and gamma jitter, illumination gradient, noise, FOV
    phi = g_tex.uniform(0, 2 * np.pi)
    ramp = 1.0 + g_tex.uniform(0.0, 0.12) * (u * np.cos(phi) + v * np.sin(phi))
    gain = g_tex.uniform(0.85, 1.15) * g_tex.uniform(0.92, 1.08, 3)
    img = np.clip(img * ramp[..., None] * gain.astype(np.float32), 0.0, 1.0) ** g_tex.uniform(0.85, 1.2)
    img += g_noise.standard_normal((size, size, 3), dtype=np.float32) * g_tex.uniform(0.004, 0.015)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    img[~fov] = 0.0

    he_pix = np.argwhere(lesions == 3) + 0.5  # (n, 2) row, col
    f_rc = (fovea_p[::-1] + 1.0) * scale
    edema = int(bool(len(he_pix)) and np.hypot(*(he_pix - f_rc).T).min() <= dd * scale)
    masks = [m.astype(np.uint8) * fov for m in (vessels, disc_m, cup_m, neo)]
    lesions = lesions * fov
    d_rc = (disc_p[::-1] + 1.0) * scale
    if left:
        img, fov, lesions = img[:, ::-1].copy(), fov[:, ::-1].copy(), lesions[:, ::-1].copy()
        masks = [m[:, ::-1].copy() for m in masks]
        f_rc, d_rc = np.array([f_rc[0], size - f_rc[1]]), np.array([d_rc[0], size - d_rc[1]])
    return FundusPhantom(
        image=img,
        fov=fov,
        vessels=masks[0],
        disc=masks[1],
        cup=masks[2],
        lesions=lesions.astype(np.uint8),
        grade=grade,
        macular_edema=edema,
        laterality="L" if left else "R",
        lesion_counts=counts,
        neovascular=masks[3],
        disc_center=(float(d_rc[0]), float(d_rc[1])),
        fovea_center=(float(f_rc[0]), float(f_rc[1])),
        disc_diameter=float(dd * scale),
    )


def make_fundus_batch(
    seeds: list[int] | np.ndarray, size: int = 64, grades: list[int | None] | None = None
) -> dict[str, np.ndarray]:
    """Stack phantoms: ``image`` (N, H, W, 3) float32, masks (N, H, W), ``grade`` (N,) int64 ..."""
    seeds = list(seeds)
    if grades is not None and len(grades) != len(seeds):
        raise DataError(f"got {len(grades)} grades for {len(seeds)} seeds; give one per seed or none")
    phs = [make_fundus(s, size, None if grades is None else grades[i]) for i, s in enumerate(seeds)]
    out = {
        k: np.stack([getattr(p, k) for p in phs])
        for k in ("image", "fov", "vessels", "disc", "cup", "lesions", "neovascular")
    }
    out["grade"] = np.array([p.grade for p in phs], np.int64)
    out["macular_edema"] = np.array([p.macular_edema for p in phs], np.int64)
    return out
