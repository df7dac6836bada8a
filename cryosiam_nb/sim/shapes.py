"""Particle species: procedural, non-symmetric 3-D assemblies and their rasterisation.

Every species is a small set of *rounded-cylinder* primitives (spheres, capsules and
discs are special cases) defined in nanometres in the species' own frame, axes (z, y, x).
No species has a rotational symmetry, so the orientation of a particle is visible in the
volume. Shapes are fixed (they do not depend on the simulation seed) so that a species is
the same object in every tomogram.

Rotations are unit quaternions ``(w, x, y, z)`` acting on points written (x, y, z) — the
columns ``rot_0..rot_3`` of the particle table. :func:`quat_to_matrix_zyx` converts one into
the 3×3 matrix acting on (z, y, x) vectors used internally.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from cryosiam_nb.constants import kda_category, size_category

__all__ = [
    "Primitive",
    "Species",
    "SPECIES",
    "species_table",
    "species_for_sample",
    "random_quaternions",
    "quat_to_matrix_zyx",
    "render_particle",
    "render_particles",
]


@dataclass(frozen=True)
class Primitive:
    """A rounded cylinder in nm, species frame (z, y, x).

    Points within ``rounding`` of the solid cylinder of radius ``radial`` and half-length
    ``half_length`` around ``axis`` through ``center`` are inside. ``radial=half_length=0``
    is a sphere, ``radial=0`` a capsule, a small ``half_length`` with a large ``radial`` a
    disc. ``density`` is the relative scattering density (protein ≈ 1).
    """

    center: tuple[float, float, float]
    rounding: float
    axis: tuple[float, float, float] = (1.0, 0.0, 0.0)
    half_length: float = 0.0
    radial: float = 0.0
    density: float = 1.0


def _sphere(c, r, rho=1.0):
    return Primitive(tuple(map(float, c)), float(r), density=rho)


def _capsule(a, b, r, rho=1.0):
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    length = float(np.linalg.norm(d))
    return Primitive(tuple((a + b) / 2), float(r), tuple(d / length), length / 2, 0.0, rho)


def _disc(c, axis, radius, half_height, rho=1.0):
    rounding = half_height
    ax = np.asarray(axis, float)
    return Primitive(
        tuple(map(float, c)), rounding, tuple(ax / np.linalg.norm(ax)), 0.0, radius - rounding, rho
    )


@dataclass(frozen=True)
class Species:
    """One particle species.

    Attributes: ``name``; ``samples`` (sample types it occurs in); ``kda`` (molecular-mass
    proxy in kDa, nominal); ``primitives`` (its shape, nm); ``description``.
    """

    name: str
    samples: tuple[str, ...]
    kda: float
    primitives: tuple[Primitive, ...] = field(repr=False)
    description: str = ""

    @functools.cached_property
    def _centred(self) -> tuple[Primitive, ...]:
        return _recentre(self.primitives)

    @property
    def volume_nm3(self) -> float:
        """Envelope volume in nm³ (rasterised at 1 nm)."""
        return _reference_volume(self.name)

    @functools.cached_property
    def extent_nm(self) -> float:
        """Largest extent (diameter of the bounding sphere) in nm."""
        return 2 * _bounding_radius(self._centred)


def _bounding_radius(prims: tuple[Primitive, ...]) -> float:
    out = 0.0
    for p in prims:
        c = np.linalg.norm(p.center)
        out = max(out, c + p.half_length + p.radial + p.rounding)
    return float(out)


def _shift(prims, delta) -> tuple[Primitive, ...]:
    delta = np.asarray(delta, float)
    return tuple(
        Primitive(
            tuple(np.asarray(p.center) - delta),
            p.rounding,
            p.axis,
            p.half_length,
            p.radial,
            p.density,
        )
        for p in prims
    )


def _distance_field(prims, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (nm) to the union and the density of the nearest-inside primitive.

    ``coords``: (..., 3) points in nm (z, y, x).
    """
    dist = np.full(coords.shape[:-1], np.inf, dtype=np.float32)
    dens = np.zeros(coords.shape[:-1], dtype=np.float32)
    for p in prims:
        q = coords - np.asarray(p.center, dtype=np.float32)
        ax = np.asarray(p.axis, dtype=np.float32)
        h = q @ ax
        rho = np.sqrt(np.maximum((q * q).sum(-1) - h * h, 0.0))
        dh = np.maximum(np.abs(h) - p.half_length, 0.0)
        dr = np.maximum(rho - p.radial, 0.0)
        d = np.sqrt(dh * dh + dr * dr) - p.rounding
        inside_better = (d < 0) & (p.density > dens)
        dens = np.where(inside_better, np.float32(p.density), dens)
        dist = np.minimum(dist, d)
    return dist, dens


def _recentre(prims: tuple[Primitive, ...]) -> tuple[Primitive, ...]:
    """Move the origin to the volume centroid (or the inside point nearest to it)."""
    step = 0.75
    r = _bounding_radius(prims) + 1
    ax = np.arange(-r, r + step, step, dtype=np.float32)
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)
    d, _ = _distance_field(prims, grid)
    inside = d < 0
    pts = grid[inside]
    c = pts.mean(0)
    cd, _ = _distance_field(prims, c[None].astype(np.float32))
    if cd[0] > -0.8:  # centroid not safely inside: take the deepest point near it
        score = np.where(inside, -d - 0.3 * np.linalg.norm(grid - c, axis=-1), -np.inf)
        idx = np.unravel_index(np.argmax(score), score.shape)
        c = grid[idx]
    return _shift(prims, c)


# --------------------------------------------------------------------------- species catalogue
def _ribosome_parts(scale: float = 1.0):
    s = scale
    large = [
        _sphere((0, 0, 0), 8.6 * s, 0.95),
        _sphere((6.5 * s, 1.0 * s, 2.5 * s), 4.0 * s, 1.0),  # central protuberance
        _capsule((2 * s, 6 * s, -2 * s), (4 * s, 11 * s, -5 * s), 2.2 * s, 0.9),  # L1 stalk
        _capsule((1 * s, -6 * s, 2 * s), (2 * s, -12 * s, 5 * s), 1.6 * s, 0.85),  # L7/L12 stalk
    ]
    small_off = np.array([0.0, 0.0, -11.0]) * s
    small = [
        _capsule(small_off + (-4 * s, -1 * s, 0), small_off + (3 * s, 1 * s, 0), 5.2 * s, 0.9),
        _sphere(small_off + (7 * s, 2 * s, -1 * s), 4.2 * s, 0.9),  # head
        _sphere(small_off + (-2 * s, 5 * s, -2 * s), 3.0 * s, 0.85),  # platform
        _sphere(small_off + (9 * s, -2.5 * s, -3 * s), 1.8 * s, 0.8),  # beak
    ]
    return large, small


def _build_species() -> dict[str, Species]:
    L, S = _ribosome_parts(1.2)
    G = ("general",)
    T = ("general", "transcription")
    C = ("general", "chromatin")
    out = [
        # ---- tiny (< 150 voxels at 10 Å)
        Species(
            "tiny_dumbbell",
            G,
            25.0,
            (
                _sphere((0, 0, 0), 2.4),
                _sphere((0.5, 0, 2.9), 1.6, 0.85),
                _sphere((-1.2, 1.8, 0.6), 1.2, 0.8),
            ),
            "two unequal lobes and a side knob",
        ),
        Species(
            "tiny_hook",
            G,
            35.0,
            (
                _capsule((0, 0, -2.2), (0, 0, 1.8), 1.7),
                _capsule((0, 0, 1.8), (1.2, 2.6, 3.0), 1.2, 0.85),
            ),
            "a bent rod",
        ),
        # ---- small (150–900)
        Species(
            "small_bilobe",
            G,
            90.0,
            (
                _sphere((0, 0, -1.5), 3.6),
                _sphere((1.5, 0.5, 3.2), 2.8, 0.85),
                _sphere((-2.2, 2.8, 1.0), 1.6, 0.8),
            ),
            "two lobes and a knob",
        ),
        Species(
            "small_tripod",
            G,
            150.0,
            (
                _sphere((0, 0, 0), 3.2),
                _capsule((0, 0, 0), (0, 0, 6.5), 1.5, 0.85),
                _capsule((0, 0, 0), (3.5, 3.0, -1.0), 1.5, 0.85),
                _capsule((0, 0, 0), (-1.0, -4.5, -2.0), 1.4, 0.8),
            ),
            "a core with three unequal legs",
        ),
        Species(
            "small_kinked_rod",
            G,
            120.0,
            (
                _capsule((0, 0, -6), (0, 0, 0), 2.1),
                _capsule((0, 0, 0), (0, 4, 3), 2.0, 0.9),
                _sphere((0, 4.5, 3.5), 2.7, 0.95),
            ),
            "a kinked rod with a head",
        ),
        Species(
            "nucleosome_like",
            C,
            206.0,
            (
                _disc((0, 0, 0), (1, 0, 0), 5.6, 2.8, 1.0),
                _capsule((2.0, 4.5, 2.5), (2.2, 8.0, 5.5), 1.0, 0.9),  # DNA entry
                _capsule((-2.0, 4.8, -2.0), (-2.5, 8.5, -4.0), 1.0, 0.9),  # DNA exit
                _sphere((0.3, 5.3, 0.2), 1.6, 0.95),  # linker histone
                _sphere((1.8, -3.0, 3.2), 2.0, 0.9),  # histone-tail bulge, one face only
            ),
            "histone disc with asymmetric DNA arms",
        ),
        # ---- medium (900–2000)
        Species(
            "rna_polymerase_like",
            T,
            390.0,
            (
                _sphere((0, 0, 0), 5.6),
                _capsule((0, 1.5, 2.5), (1.5, 8.5, 5.0), 2.8, 0.9),  # long jaw
                _capsule((0, -1.5, 2.5), (-1.0, -6.0, 6.0), 2.6, 0.9),  # short jaw
                _sphere((-4.5, 0.5, -3.0), 2.4, 0.85),
            ),
            "crab-claw: a body with two unequal jaws",
        ),
        Species(
            "medium_capped_barrel",
            G,
            450.0,
            (
                _disc((0, 0, 0), (0, 0, 1), 6.0, 4.5, 0.9),
                _sphere((1.5, 2.0, 6.0), 3.8, 1.0),
                _sphere((-3.0, -3.5, 5.5), 2.0, 0.8),
            ),
            "a barrel with an off-axis cap",
        ),
        Species(
            "medium_L",
            G,
            300.0,
            (
                _capsule((0, -5, -4), (0, 6, -4), 3.9),
                _capsule((0, 6, -4), (1.5, 6, 5), 3.5, 0.9),
                _sphere((2.0, -5, -4), 2.2, 0.85),
            ),
            "an L-shaped dimer",
        ),
        # ---- big (2000–6000)
        Species(
            "ribosome_50S_like",
            T,
            1600.0,
            tuple(L),
            "large ribosomal subunit: body, central protuberance, two stalks",
        ),
        Species(
            "ribosome_30S_like",
            T,
            900.0,
            tuple(_shift(S, (0, 0, -13.2))),
            "small ribosomal subunit: body, head, platform, beak",
        ),
        Species(
            "big_trimer",
            G,
            800.0,
            (
                _sphere((0, 0, 0), 7.0, 0.95),
                _sphere((0, 7.5, 9.0), 6.0, 0.9),
                _sphere((3.0, -8.0, 7.5), 5.0, 0.85),
            ),
            "three unequal globules in an irregular triangle",
        ),
        # ---- very big (> 6000)
        Species(
            "ribosome_70S_like",
            T,
            2500.0,
            tuple(L + S),
            "full ribosome: 50S-like and 30S-like subunits",
        ),
        Species(
            "proteasome_26S_like",
            G,
            2500.0,
            (
                _disc((0, 0, 0), (0, 0, 1), 7.2, 7.5, 0.9),
                _sphere((0.5, 1.0, 12.0), 7.8, 1.0),  # 19S cap, one end only
                _sphere((5.0, 3.0, 16.0), 3.8, 0.9),  # lid knob
                _capsule((-5.0, 2.0, 12.0), (-9.5, 3.0, 15.0), 2.4, 0.85),
            ),
            "a core barrel with one regulatory cap",
        ),
        Species(
            "megacomplex",
            G,
            4000.0,
            (
                _sphere((0, 0, 0), 9.6),
                _sphere((2.4, 11.4, 4.8), 8.4, 0.9),
                _sphere((-3.6, -7.2, 10.8), 7.4, 0.95),
                _sphere((4.8, 2.4, -11.4), 6.0, 0.85),
                _capsule((-6.0, 9.6, -4.8), (-7.2, 16.8, -9.6), 3.0, 0.8),
            ),
            "a five-lobed irregular assembly",
        ),
    ]
    return {s.name: s for s in out}


_SPECIES: dict[str, Species] = _build_species()


@functools.cache
def _reference_volume(name: str) -> float:
    d, _, step, _ = _reference_fields(name, 10.0)
    return float((d < 0).sum() * step**3)


def species_table() -> pd.DataFrame:
    """The species catalogue: name, samples, kda (proxy), volume_nm3, extent_nm, categories.

    ``size_category_10A`` is the SPEC §5 voxel category at 10 Å/voxel (1 voxel = 1 nm³);
    ``kda_category`` the thesis' molecular-weight bin of the nominal mass.
    """
    rows = []
    for s in _SPECIES.values():
        v = s.volume_nm3
        rows.append(
            {
                "name": s.name,
                "samples": ",".join(s.samples),
                "kda": s.kda,
                "volume_nm3": round(v, 1),
                "extent_nm": round(s.extent_nm, 1),
                "size_category_10A": size_category(v),
                "kda_category": kda_category(s.kda),
                "description": s.description,
            }
        )
    return pd.DataFrame(rows)


class _SpeciesMapping(dict):
    """``name → Species`` mapping with a ``.table()`` helper (a pandas DataFrame)."""

    def table(self) -> pd.DataFrame:
        return species_table()


#: All species, ``name → Species``; ``SPECIES.table()`` gives a DataFrame.
SPECIES: _SpeciesMapping = _SpeciesMapping(_SPECIES)


def species_for_sample(sample: str) -> list[Species]:
    """Species occurring in ``sample`` ("general", "transcription", "chromatin"), largest first."""
    out = [s for s in _SPECIES.values() if sample in s.samples]
    return sorted(out, key=lambda s: -s.volume_nm3)


# --------------------------------------------------------------------------- rotations
def random_quaternions(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniformly distributed unit quaternions (w, x, y, z), w >= 0 (Shoemake 1992)."""
    u1, u2, u3 = rng.random((3, n))
    a, b = np.sqrt(1 - u1), np.sqrt(u1)
    q = np.stack(
        [
            b * np.cos(2 * np.pi * u3),
            a * np.sin(2 * np.pi * u2),
            a * np.cos(2 * np.pi * u2),
            b * np.sin(2 * np.pi * u3),
        ],
        axis=1,
    )
    q[q[:, 0] < 0] *= -1
    return q


def quat_to_matrix_zyx(q: np.ndarray) -> np.ndarray:
    """3×3 rotation acting on (z, y, x) column vectors for quaternion ``q = (w, x, y, z)``."""
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    m_xyz = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    perm = [2, 1, 0]  # xyz <-> zyx
    return m_xyz[np.ix_(perm, perm)]


def _rotate(prims: tuple[Primitive, ...], m_zyx: np.ndarray) -> tuple[Primitive, ...]:
    return tuple(
        Primitive(
            tuple(m_zyx @ np.asarray(p.center)),
            p.rounding,
            tuple(m_zyx @ np.asarray(p.axis)),
            p.half_length,
            p.radial,
            p.density,
        )
        for p in prims
    )


@functools.lru_cache(maxsize=64)
def _reference_fields(name: str, voxel_size: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Signed distance (nm) and density of a species sampled on a fine grid (cached)."""
    prims = _SPECIES[name]._centred
    vs_nm = voxel_size / 10.0
    step = float(min(1.0, vs_nm))
    r = _bounding_radius(prims) + 2 * vs_nm + step
    n = int(np.ceil(r / step))
    ax = np.arange(-n, n + 1, dtype=np.float32) * step
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)
    d, rho = _distance_field(prims, grid)
    return d, rho, step, float(n)


def render_particles(
    species: Species | str, quaternions: np.ndarray, voxel_size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise ``K`` rotated copies of one species, each centred on a voxel.

    Returns ``(density, mask, halo)`` of shape ``(K, b, b, b)`` (``b`` odd; the centre
    voxel ``b // 2`` is the particle centre): ``density`` float32 with a one-voxel soft
    edge, ``mask`` bool (voxel centre inside the envelope; the centre voxel is always
    inside), ``halo`` bool (``mask`` grown by one voxel, 6-connectivity). The species'
    fine-grid distance field is cached and resampled (trilinear) at the rotated voxel
    centres, so all ``K`` particles cost one vectorised pass.
    """
    sp = _SPECIES[species] if isinstance(species, str) else species
    q = np.atleast_2d(np.asarray(quaternions, dtype=float))
    k = len(q)
    dref, rhoref, step, n = _reference_fields(sp.name, float(voxel_size))
    vs_nm = voxel_size / 10.0
    half = int(np.ceil(sp.extent_nm / 2 / vs_nm)) + 1
    b = 2 * half + 1
    ax = np.arange(-half, half + 1, dtype=np.float32)
    full = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), 0).reshape(3, -1)
    # only voxels within the bounding sphere (+ soft edge and halo) can be inside
    in_ball = (full**2).sum(0) <= (half + 0.5) ** 2
    grid = full[:, in_ball] * np.float32(vs_nm / step)
    mats = np.stack([quat_to_matrix_zyx(x).T for x in q]).astype(np.float32)  # (K,3,3)
    # a voxel at tomogram offset p samples the species frame at m^T p
    ref = np.matmul(mats, grid)  # (K, 3, M)
    ref = ref.transpose(1, 0, 2).reshape(3, -1) + np.float32(n)
    shape = (k, b, b, b)
    d_ball = ndimage.map_coordinates(dref, ref, order=1, mode="constant", cval=1e3)
    d_vox = np.full((k, b**3), np.float32(1e3))
    d_vox[:, in_ball] = d_ball.reshape(k, -1) / np.float32(vs_nm)
    d_vox = d_vox.reshape(shape)
    mask = d_vox < 0
    mask[:, half, half, half] = True
    # per-primitive density only where it matters (inside or on the soft rim)
    rim_ball = d_ball < 0.5 * vs_nm
    rho_ball = np.full(d_ball.shape, np.float32(0.9))
    rho_ball[rim_ball] = ndimage.map_coordinates(rhoref, ref[:, rim_ball], order=0, cval=0.0)
    rho_ball[rho_ball <= 0] = 0.9
    rho = np.full((k, b**3), np.float32(0.9))
    rho[:, in_ball] = rho_ball.reshape(k, -1)
    density = (np.clip(0.5 - d_vox, 0.0, 1.0) * rho.reshape(shape)).astype(np.float32)
    density[:, half, half, half] = np.maximum(density[:, half, half, half], 0.9)
    st = np.zeros((3, 3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(3, 1)
    halo = ndimage.binary_dilation(mask, structure=st)
    return density, mask, halo


def render_particle(
    species: Species | str, quaternion: np.ndarray, voxel_size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One particle: :func:`render_particles` with ``K = 1``, returned without the K axis."""
    density, mask, halo = render_particles(species, np.asarray(quaternion)[None], voxel_size)
    return density[0], mask[0], halo[0]
