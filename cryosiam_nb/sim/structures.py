"""Scene building: lamella slab, membranes, filaments (microtubules, actin, DNA) and crowded
particles, with ground truth.

All lengths given to the public helpers are in nm and converted with the voxel size
(Å/voxel); arrays are (z, y, x). Semantic classes: 0 background, 1 membrane,
2 microtubule, 3 particle, 4 actin, 5 DNA/RNA filament.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .shapes import (
    Species,
    random_quaternions,
    render_particles,
    size_category,
    species_for_sample,
)

__all__ = ["Scene", "Lamella", "build_scene", "SAMPLE_DEFAULTS"]

BACKGROUND, MEMBRANE, MICROTUBULE, PARTICLE, ACTIN, DNA = range(6)

#: Per-sample defaults: particle volume fraction and structure counts per (256 nm)² of area.
SAMPLE_DEFAULTS: dict[str, dict[str, float]] = {
    "general": {
        "crowding": 0.2,
        "vesicles": 1.5,
        "sheets": 0.5,
        "microtubules": 0.8,
        "actin": 4.0,
        "dna": 0.0,
    },
    "transcription": {
        "crowding": 0.25,
        "vesicles": 0.0,
        "sheets": 0.0,
        "microtubules": 0.0,
        "actin": 0.0,
        "dna": 4.0,
    },
    "chromatin": {
        "crowding": 0.2,
        "vesicles": 0.0,
        "sheets": 0.0,
        "microtubules": 0.0,
        "actin": 0.0,
        "dna": 10.0,
    },
}


@dataclass
class Lamella:
    """A flat slab of ``thickness`` voxels around the plane through ``center`` with unit
    ``normal`` (z, y, x), nearly parallel to the (y, x) plane."""

    center: np.ndarray
    normal: np.ndarray
    thickness: float

    def signed_distance(self, coords: np.ndarray) -> np.ndarray:
        """Distance in voxels of points ``coords`` (..., 3) from the mid-plane."""
        return (coords - self.center) @ self.normal

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Boolean (z, y, x) mask of the voxels inside the slab."""
        y = np.arange(shape[1], dtype=np.float64)[:, None]
        x = np.arange(shape[2], dtype=np.float64)[None, :]
        mid = self.mid_z(y, x)
        half = self.thickness / 2 / abs(self.normal[0])
        z = np.arange(shape[0], dtype=np.float32)[:, None, None]
        return (z > (mid - half).astype(np.float32)) & (z < (mid + half).astype(np.float32))

    def mid_z(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z of the mid-plane above (y, x)."""
        c, n = self.center, self.normal
        return c[0] - ((y - c[1]) * n[1] + (x - c[2]) * n[2]) / n[0]


@dataclass
class Scene:
    """Ground-truth volumes and particle table of one simulated sample."""

    clean: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    lamella: np.ndarray
    particles: pd.DataFrame
    lamella_geometry: Lamella
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- geometry helpers
def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _random_unit(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    v = rng.normal(size=(3,) if n is None else (n, 3))
    return _unit(v)


def _in_plane_direction(rng: np.random.Generator, normal: np.ndarray, tilt_sd: float = 0.1):
    """A random direction roughly parallel to the lamella plane."""
    v = rng.normal(size=3)
    v -= (v @ normal) * normal
    v = _unit(v) + rng.normal(0, tilt_sd) * normal
    return _unit(v)


def _box(lo: np.ndarray, hi: np.ndarray, shape) -> tuple[slice, ...] | None:
    lo = np.maximum(np.floor(lo).astype(int), 0)
    hi = np.minimum(np.ceil(hi).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _grid(box: tuple[slice, ...]) -> list[np.ndarray]:
    return [
        np.arange(s.start, s.stop, dtype=np.float32).reshape(
            [-1 if i == j else 1 for j in range(3)]
        )
        for i, s in enumerate(box)
    ]


def curve_distance(
    points: np.ndarray, radius: float, shape: tuple[int, int, int]
) -> tuple[tuple[slice, ...] | None, np.ndarray]:
    """Distance (voxels) to a densely sampled curve, within ``radius`` + 1 of it.

    ``points`` (N, 3) in voxels (z, y, x), spaced ≤ 0.5 voxel. Returns the bounding box
    (slices into ``shape``) and the distance array on it (``inf`` far from the curve).
    """
    pts = np.asarray(points, dtype=np.float32)
    # point spacing ~radius/3 (<= 2 voxels) keeps the error below ~0.05 voxel
    keep = max(1, int(round(np.clip(radius / 3, 0.5, 2.0) / 0.5)))
    if keep > 1 and len(pts) > 2:
        pts = np.concatenate([pts[::keep], pts[-1:]])
    spacing = 0.5 * keep
    chunk = max(2, int(max(radius, 4.0) / spacing))
    margin = radius + 1.0
    box = _box(pts.min(0) - margin, pts.max(0) + margin, shape)
    if box is None:
        return None, np.zeros((0, 0, 0), np.float32)
    out = np.full(tuple(s.stop - s.start for s in box), np.inf, dtype=np.float32)
    off = np.array([s.start for s in box])
    for i in range(0, len(pts), chunk):
        p = pts[i : i + chunk + 1]
        sub = _box(p.min(0) - margin, p.max(0) + margin, shape)
        if sub is None:
            continue
        zz, yy, xx = _grid(sub)
        d2 = np.full(tuple(s.stop - s.start for s in sub), np.inf, dtype=np.float32)
        for q in p:
            np.minimum(d2, (zz - q[0]) ** 2 + (yy - q[1]) ** 2 + (xx - q[2]) ** 2, out=d2)
        loc = tuple(slice(s.start - o, s.stop - o) for s, o in zip(sub, off))
        np.minimum(out[loc], np.sqrt(d2), out=out[loc])
    return box, out


def worm_like_chain(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    persistence: float,
    step: float = 0.5,
    confine=None,
) -> np.ndarray:
    """Discrete worm-like chain (voxels): ``length`` and ``persistence`` in voxels.

    Each step turns the tangent by a Gaussian angle with variance ``step / persistence``
    (so the tangent correlation decays as exp(-s / persistence)). ``confine(p, t)`` may
    return a corrected tangent (reflection at the lamella surfaces) or None to stop.
    """
    n = max(int(length / step), 2)
    pts = np.empty((n, 3), dtype=np.float64)
    p = np.asarray(start, float).copy()
    t = _unit(np.asarray(direction, float))
    sd = np.sqrt(step / max(persistence, 1e-6))
    kicks = rng.normal(0, sd, size=(n, 3))
    k = 0
    for k in range(n):
        pts[k] = p
        kick = kicks[k] - (kicks[k] @ t) * t
        t = _unit(t + kick)
        if confine is not None:
            t = confine(p, t)
            if t is None:
                break
        p = p + step * t
    else:
        k = n
    return pts[: max(k, 1)]


# --------------------------------------------------------------------------- scene
class _Canvas:
    def __init__(self, shape, lamella: Lamella, voxel_size: float):
        self.shape = shape
        self.vs_nm = voxel_size / 10.0
        self.lam = lamella
        self.lamella = lamella.mask(shape)
        self.clean = np.zeros(shape, np.float32)
        self.semantic = np.zeros(shape, np.uint8)
        self.instances = np.zeros(shape, np.uint32)
        self.occupied = np.zeros(shape, bool)

    def nm(self, x: float) -> float:
        """nm → voxels."""
        return x / self.vs_nm

    def paint(self, box, density, label_mask, cls, occupy_mask=None) -> bool:
        """Paint a structure clipped to the lamella unless it collides with another class."""
        lam = self.lamella[box]
        label_mask = label_mask & lam
        if not label_mask.any():
            return False
        occ = label_mask if occupy_mask is None else (occupy_mask & lam)
        sem = self.semantic[box]
        if np.any((sem[occ] != 0) & (sem[occ] != cls)):
            return False
        np.maximum(self.clean[box], density * lam, out=self.clean[box])
        sem[label_mask & (sem == 0)] = cls
        self.occupied[box] |= occ
        return True

    def random_point_in_lamella(self, rng, margin: float = 0.0) -> np.ndarray:
        nz, ny, nx = self.shape
        y, x = rng.uniform(0, ny - 1), rng.uniform(0, nx - 1)
        half = max(self.lam.thickness / 2 - margin, 0.0)
        z = self.lam.mid_z(np.array(y), np.array(x)) + rng.uniform(-half, half)
        return np.array([float(z), y, x])


def _bilayer(s_nm: np.ndarray, vs_nm: float) -> np.ndarray:
    """Bilayer density across the membrane: two head-group layers 4 nm apart."""
    sig2 = 0.8**2 + (0.5 * vs_nm) ** 2
    g = np.exp(-((s_nm - 2.0) ** 2) / (2 * sig2)) + np.exp(-((s_nm + 2.0) ** 2) / (2 * sig2))
    return (0.85 * g + 0.25 * np.exp(-(s_nm**2) / (2 * 1.5**2))).astype(np.float32)


def _membrane_half_width(cv: _Canvas) -> float:
    return max(2.5, 0.75 * cv.vs_nm)


def _add_vesicle(cv: _Canvas, rng) -> bool:
    extent_nm = min(cv.shape[1], cv.shape[2]) * cv.vs_nm
    r_nm = rng.uniform(20.0, max(25.0, min(80.0, extent_nm / 3)))
    axes = r_nm * (1 + rng.uniform(-0.12, 0.12, size=3))
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    c = cv.random_point_in_lamella(rng)
    reach = cv.nm(axes.max() + 5)
    box = _box(c - reach, c + reach, cv.shape)
    if box is None:
        return False
    zz, yy, xx = _grid(box)
    p = np.stack(np.broadcast_arrays(zz - c[0], yy - c[1], xx - c[2]), -1) * cv.vs_nm
    q = p @ rot  # into the ellipsoid frame
    rho = np.sqrt(((q / axes) ** 2).sum(-1))
    s = (rho - 1.0) * axes.mean()
    hw = _membrane_half_width(cv)
    label = np.abs(s) < hw
    occupy = np.abs(s) < hw + cv.vs_nm
    return cv.paint(box, _bilayer(s, cv.vs_nm) * (np.abs(s) < hw + 2), label, MEMBRANE, occupy)


def _add_sheet(cv: _Canvas, rng) -> bool:
    n = _unit(rng.normal(size=3) * np.array([0.5, 1.0, 1.0]))  # avoid sheets parallel to (y, x)
    c = cv.random_point_in_lamella(rng)
    curv = rng.uniform(-1, 1) / 600.0  # 1/nm
    box = tuple(slice(0, s) for s in cv.shape)
    zz, yy, xx = _grid(box)
    dz, dy, dx = (zz - c[0]) * cv.vs_nm, (yy - c[1]) * cv.vs_nm, (xx - c[2]) * cv.vs_nm
    h = dz * n[0] + dy * n[1] + dx * n[2]
    perp2 = dz**2 + dy**2 + dx**2 - h**2
    s = h + 0.5 * curv * perp2
    hw = _membrane_half_width(cv)
    r_patch = rng.uniform(60.0, 250.0)  # nm: a cisterna-like patch, not an endless plane
    patch = perp2 < r_patch**2
    near = (np.abs(s) < hw + 2) & patch
    if not near.any():
        return False
    idx = np.argwhere(near)
    sub = _box(idx.min(0), idx.max(0), cv.shape)
    s = s[sub]
    near = near[sub]
    patch = patch[sub]
    label = (np.abs(s) < hw) & patch
    occupy = (np.abs(s) < hw + cv.vs_nm) & patch
    dens = np.zeros(s.shape, np.float32)
    dens[near] = _bilayer(s[near], cv.vs_nm)
    return cv.paint(sub, dens, label, MEMBRANE, occupy)


def _through_volume(cv: _Canvas, rng, length_nm: float, tilt_sd=0.05) -> np.ndarray:
    """Points (0.5 voxel apart) of a straight segment of ``length_nm`` in the lamella plane,
    clipped to the volume (with a margin)."""
    c = cv.random_point_in_lamella(rng, margin=cv.nm(13))
    d = _in_plane_direction(rng, cv.lam.normal, tilt_sd)
    half = cv.nm(length_nm) / 2
    t = np.arange(-half, half, 0.5)
    pts = c + t[:, None] * d
    inside = np.all((pts > -15) & (pts < np.array(cv.shape) + 15), axis=1)
    return pts[inside]


def _add_microtubule(cv: _Canvas, rng) -> bool:
    pts = _through_volume(cv, rng, rng.uniform(150.0, 800.0), tilt_sd=0.03)
    if len(pts) < 4:
        return False
    # gentle bending: WLC with a very long persistence length
    pts = worm_like_chain(
        rng, pts[0], pts[-1] - pts[0], len(pts) * 0.5, persistence=cv.nm(5000.0), step=0.5
    )
    r_out, r_in = max(cv.nm(12.5), 1.5), max(cv.nm(8.5), 0.5)
    box, d = curve_distance(pts, r_out + 1, cv.shape)
    if box is None:
        return False
    wall = (d < r_out) & (d >= r_in)
    dens = 0.8 * np.clip(0.5 + r_out - d, 0, 1) * np.clip(0.5 + d - r_in, 0, 1)
    return cv.paint(box, dens.astype(np.float32), wall, MICROTUBULE, d < r_out + 1)


def _frames(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parallel-transport normal and binormal along a polyline."""
    t = np.gradient(pts, axis=0)
    t = _unit(t + 1e-9)
    n = np.empty_like(pts)
    ref = np.array([1.0, 0.0, 0.0]) if abs(t[0, 0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    n[0] = _unit(ref - (ref @ t[0]) * t[0])
    for i in range(1, len(pts)):
        v = n[i - 1] - (n[i - 1] @ t[i]) * t[i]
        n[i] = _unit(v)
    return n, np.cross(t, n)


def _add_actin(cv: _Canvas, rng) -> bool:
    length = cv.nm(rng.uniform(100, 400))
    start = cv.random_point_in_lamella(rng, margin=cv.nm(5))
    d = _in_plane_direction(rng, cv.lam.normal, 0.15)
    axis = worm_like_chain(rng, start, d, length, persistence=cv.nm(3000.0), step=0.5)
    if len(axis) < 4:
        return False
    nrm, bin_ = _frames(axis)
    s_nm = np.arange(len(axis)) * 0.5 * cv.vs_nm
    phase = 2 * np.pi * s_nm / 72.0 + rng.uniform(0, 2 * np.pi)  # crossover every 36 nm
    r_h = cv.nm(2.3)
    strands = [
        axis + r_h * (np.cos(phase + k)[:, None] * nrm + np.sin(phase + k)[:, None] * bin_)
        for k in (0.0, np.pi)
    ]
    r_s = max(cv.nm(2.4), 0.7)
    box, dist = curve_distance(np.concatenate(strands), r_s + 1, cv.shape)
    if box is None:
        return False
    dens = 0.85 * np.clip(0.5 + r_s - dist, 0, 1)
    return cv.paint(box, dens.astype(np.float32), dist < r_s, ACTIN, dist < r_s + 1)


def _dna_confine(cv: _Canvas, margin: float):
    lam, shape = cv.lam, np.array(cv.shape)

    def confine(p, t):
        s = (p - lam.center) @ lam.normal
        half = lam.thickness / 2 - margin
        if (s > half and t @ lam.normal > 0) or (s < -half and t @ lam.normal < 0):
            t = t - 2 * (t @ lam.normal) * lam.normal
        for ax in (1, 2):  # reflect at the volume sides
            if (p[ax] < margin and t[ax] < 0) or (p[ax] > shape[ax] - 1 - margin and t[ax] > 0):
                t = t.copy()
                t[ax] = -t[ax]
        return t

    return confine


def _add_dna(cv: _Canvas, rng) -> np.ndarray | None:
    """One worm-like-chain DNA (2 nm thick, persistence 50 nm); returns its points."""
    length = cv.nm(rng.uniform(300, 1500))
    start = cv.random_point_in_lamella(rng, margin=cv.nm(3))
    pts = worm_like_chain(
        rng,
        start,
        _random_unit(rng),
        length,
        persistence=cv.nm(50.0),
        step=0.5,
        confine=_dna_confine(cv, cv.nm(2.0)),
    )
    r = max(cv.nm(1.0), 0.6)
    box, dist = curve_distance(pts, r + 1, cv.shape)
    if box is None:
        return None
    dens = np.clip(0.5 + r - dist, 0, 1).astype(np.float32)
    if cv.paint(box, dens, dist < r, DNA, dist < r + 0.5):
        return pts
    return None


def _n_objects(rng, per_area: float, shape, vs_nm: float) -> int:
    """Poisson count for a density per (256 nm)², at least 1 when the mean is >= 0.5."""
    mean = per_area * shape[1] * shape[2] * vs_nm**2 / 256.0**2
    n = int(rng.poisson(mean))
    return max(n, 1) if mean >= 0.5 else n


def _place_particles(
    cv: _Canvas,
    rng: np.random.Generator,
    species: list[Species],
    crowding: float,
    anchors: np.ndarray | None,
    max_tries: int,
    orientation_pool: int | None,
    progress: bool,
) -> pd.DataFrame:
    """Random sequential insertion, largest species first, each to an equal share of volume.

    A species with more than ``orientation_pool`` copies is rasterised in that many random
    orientations and every copy takes one of them at random (the table records the exact
    quaternion of each copy); ``None`` gives every copy its own orientation.
    """
    shape = np.array(cv.shape)
    occupied = ~cv.lamella | cv.occupied
    free = int((~occupied).sum())
    target = crowding * free / max(len(species), 1)
    vs = cv.vs_nm * 10.0
    lam = cv.lam
    rows: list[dict] = []
    next_id = 1
    it = species
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(species, desc="placing particles", unit="species", leave=False)
    for sp in it:
        vox = sp.volume_nm3 / cv.vs_nm**3
        expected = target / max(vox, 1.0)
        n = int(rng.poisson(expected)) if expected < 1000 else int(round(expected))
        if n == 0:
            continue
        n_render = n if orientation_pool is None else min(n, orientation_pool)
        quats = random_quaternions(rng, n_render)
        which = np.arange(n) if n_render == n else rng.integers(0, n_render, size=n)
        dens, masks, halos = render_particles(sp, quats, vs)
        b = dens.shape[1]
        h = b // 2
        lo, hi = np.full(3, h), shape - h - 1
        if np.any(hi < lo):
            continue
        # all candidate centres for this species at once
        m_try = n * max_tries
        cy = rng.uniform(lo[1], hi[1], m_try)
        cx = rng.uniform(lo[2], hi[2], m_try)
        cz = lam.mid_z(cy, cx) + rng.uniform(-lam.thickness / 2, lam.thickness / 2, m_try)
        cand = np.stack([cz, cy, cx], 1)
        if anchors is not None and len(anchors):
            use = rng.random(m_try) < 0.7
            a = anchors[rng.integers(len(anchors), size=m_try)]
            off = _random_unit(rng, m_try) * (cv.nm(sp.extent_nm / 2) * 0.6 + 1.5)
            cand[use] = (a + off)[use]
        cand = np.rint(cand).astype(int).reshape(n, max_tries, 3)
        ok_all = np.all((cand >= lo) & (cand <= hi), axis=2)
        # the centre voxel is always inside the particle, and occupancy only grows: a
        # candidate whose centre is already occupied can never fit
        cc = np.clip(cand, 0, shape - 1)
        ok_all &= ~occupied[cc[..., 0], cc[..., 1], cc[..., 2]]
        for k in range(n):
            j = which[k]
            m, hal = masks[j], halos[j]
            for c in cand[k][ok_all[k]]:
                box = tuple(slice(int(ci - h), int(ci + h + 1)) for ci in c)
                if occupied[box][m].any():
                    continue
                occupied[box] |= hal
                np.maximum(cv.clean[box], dens[j], out=cv.clean[box])
                cv.semantic[box][m] = PARTICLE
                cv.instances[box][m] = next_id
                q = quats[j]
                rows.append(
                    (next_id, sp.name, float(c[0]), float(c[1]), float(c[2]), *q, int(m.sum()))
                )
                rows[-1] = rows[-1] + (sp.kda,)
                next_id += 1
                break
    cols = ["id", "species", "z", "y", "x", "rot_0", "rot_1", "rot_2", "rot_3"]
    cols += ["n_voxels", "mass_kda"]
    df = pd.DataFrame(rows, columns=cols)
    df.insert(2, "size_category", [size_category(v) for v in df["n_voxels"]])
    df["id"] = df["id"].astype(np.uint32)
    df["n_voxels"] = df["n_voxels"].astype(np.int64)
    for c in ("z", "y", "x", "rot_0", "rot_1", "rot_2", "rot_3", "mass_kda"):
        df[c] = df[c].astype(np.float64)
    return df


def build_scene(
    shape: tuple[int, int, int],
    voxel_size: float,
    sample: str,
    rng: np.random.Generator,
    thickness_nm: float,
    crowding: float | None = None,
    lamella_tilt_deg: float = 3.0,
    structures: dict[str, float] | None = None,
    max_tries: int = 20,
    orientation_pool: int | None = 64,
    progress: bool = False,
) -> Scene:
    """Build the ground truth of one sample (see :func:`cryosiam_nb.sim.simulate`)."""
    if sample not in SAMPLE_DEFAULTS:
        raise ValueError(
            f"sample: unknown sample type {sample!r}; choose one of {sorted(SAMPLE_DEFAULTS)}"
        )
    defaults = dict(SAMPLE_DEFAULTS[sample])
    if structures:
        unknown = set(structures) - set(defaults)
        if unknown:
            raise ValueError(f"structures: unknown keys {sorted(unknown)}")
        defaults.update(structures)
    crowding = defaults["crowding"] if crowding is None else float(crowding)
    if not 0 <= crowding <= 0.8:
        raise ValueError(f"crowding: must be a volume fraction in [0, 0.8], got {crowding}")
    nz, ny, nx = shape
    vs_nm = voxel_size / 10.0
    t_vox = min(thickness_nm / vs_nm, 0.85 * nz)
    margin = (nz - t_vox) / 2
    slope = np.tan(np.deg2rad(rng.uniform(-lamella_tilt_deg, lamella_tilt_deg, size=2)))
    max_slope = 0.8 * margin / max(ny / 2 + nx / 2, 1)
    slope = np.clip(slope, -max_slope, max_slope)
    normal = _unit(np.array([1.0, -slope[0], -slope[1]]))
    lam = Lamella(np.array([(nz - 1) / 2, (ny - 1) / 2, (nx - 1) / 2]), normal, t_vox)
    cv = _Canvas(shape, lam, voxel_size)

    counts = {}
    for key, fn in (
        ("vesicles", _add_vesicle),
        ("sheets", _add_sheet),
        ("microtubules", _add_microtubule),
        ("actin", _add_actin),
    ):
        n = _n_objects(rng, defaults[key], shape, vs_nm)
        done = 0
        for _ in range(5 * n):
            if done >= n:
                break
            done += bool(fn(cv, rng))
        counts[key] = done
    anchors = []
    n_dna = _n_objects(rng, defaults["dna"], shape, vs_nm)
    done = 0
    for _ in range(3 * n_dna):
        if done >= n_dna:
            break
        pts = _add_dna(cv, rng)
        if pts is not None:
            anchors.append(pts[::10])
            done += 1
    counts["dna"] = done
    anchor_pts = np.concatenate(anchors) if (anchors and sample == "chromatin") else None
    parts = _place_particles(
        cv,
        rng,
        species_for_sample(sample),
        crowding,
        anchor_pts,
        max_tries,
        orientation_pool,
        progress,
    )
    cv.clean[~cv.lamella] = 0.0  # soft particle rims stop at the milled surfaces
    lam_vox = int(cv.lamella.sum())
    info = {
        "thickness_nm": float(t_vox * vs_nm),
        "lamella_normal": [float(v) for v in normal],
        "structures": counts,
        "n_particles": len(parts),
        "crowding_target": crowding,
        "crowding_achieved": float(parts["n_voxels"].sum() / max(lam_vox, 1)),
    }
    return Scene(
        clean=cv.clean,
        semantic=cv.semantic,
        instances=cv.instances,
        lamella=cv.lamella.astype(np.uint8),
        particles=parts,
        lamella_geometry=lam,
        info=info,
    )
