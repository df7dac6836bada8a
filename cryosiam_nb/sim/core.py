"""``simulate``: one synthetic tomogram with complete ground truth."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from cryosiam_nb.constants import SEMANTIC_CLASSES
from cryosiam_nb.io import InputError

from . import imaging
from .structures import SAMPLE_DEFAULTS, build_scene

__all__ = ["simulate", "Simulation", "SEMANTIC_CLASSES", "SAMPLES", "MODES"]

SAMPLES: tuple[str, ...] = tuple(SAMPLE_DEFAULTS)
MODES: tuple[str, ...] = ("tilt", "fast")
VOLUME_VARIABLES: tuple[str, ...] = ("clean", "noisy", "semantic", "instances", "lamella")

# Fast mode: the reconstruction of a tilt series of n tilts with projection SNR s has a
# volume SNR of about _FAST_SNR_GAIN * s * n (calibrated against tilt mode, WBP + Hann).
_FAST_SNR_GAIN = 0.07


def _error(msg: str) -> InputError:
    return InputError(msg)


@dataclass
class Simulation:
    """A simulated tomogram and its ground truth.

    Attributes
    ----------
    volumes
        ``xarray.Dataset`` on one (z, y, x) grid, coordinates in Å,
        ``attrs["voxel_size"]`` in Å:

        - ``clean`` float32, protein bright, 0 = ice/vacuum, ~1 = protein (no CTF, no noise);
        - ``noisy`` float32 in [0, 1], **protein bright**: the reconstruction of the imaged
          tilt series (raw cryo-ET contrast has dark protein; ``noisy`` is already
          multiplied by −1 and normalised at the 0.1/99.9 percentiles, i.e. what
          ``pp.normalize(invert=True)`` gives on real data). ``raw_noisy`` gives the
          raw-contrast (dark protein) version;
        - ``semantic`` uint8, classes :data:`SEMANTIC_CLASSES`;
        - ``instances`` uint32, particle ids (``particles.id``), 0 elsewhere;
        - ``lamella`` uint8, 1 inside the sample slab.
    particles
        ``pandas.DataFrame``: ``id, species, size_category, z, y, x`` (voxels, the centre
        voxel, always inside the instance), ``rot_0..rot_3`` (unit quaternion w, x, y, z
        rotating the species frame, xyz convention), ``n_voxels``, ``mass_kda`` (proxy).
    params
        Every parameter used (drawn ones included), JSON-serialisable.
    tilt_series
        Tilt mode only (``None`` in fast mode): ``xarray.Dataset`` with ``clean``
        (noise-free CTF-modulated contrast images) and ``noisy`` (with shot noise), dims
        (tilt, y, x), coordinate ``tilt`` in degrees; raw contrast (protein dark).
    name
        Tomogram name when read back from a dataset folder (``read_dataset``).
    """

    volumes: xr.Dataset
    particles: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)
    tilt_series: xr.Dataset | None = None
    name: str | None = None

    @property
    def voxel_size(self) -> float:
        """Voxel size in Å."""
        return float(self.volumes.attrs["voxel_size"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (z, y, x) in voxels."""
        return tuple(int(self.volumes.sizes[d]) for d in ("z", "y", "x"))

    @property
    def raw_noisy(self) -> xr.DataArray:
        """``noisy`` in raw cryo-ET contrast (dark protein on bright ice), in [0, 1]."""
        out = (1.0 - self.volumes["noisy"]).astype(np.float32)
        return out.rename("raw_noisy").assign_attrs(
            self.volumes["noisy"].attrs, contrast="raw (protein dark)"
        )

    def __getitem__(self, name: str) -> xr.DataArray:
        if name == "raw_noisy":
            return self.raw_noisy
        return self.volumes[name]

    def __repr__(self) -> str:
        p = self.params
        counts = self.particles["size_category"].value_counts().to_dict()
        return (
            f"Simulation(sample={p.get('sample')!r}, shape={self.shape}, "
            f"voxel_size={self.voxel_size:g} Å, mode={p.get('mode')!r}, "
            f"particles={len(self.particles)} {counts})"
        )

    def write(
        self,
        folder: str | Path,
        format: str = "mrc",
        overwrite: bool = False,
        table_format: str = "csv",
    ) -> dict[str, str]:
        """Write the five volumes (``<var>.mrc`` or ``.zarr``) and ``particles.csv`` (or
        ``.parquet``) into ``folder`` (created atomically). Returns ``{name: relative
        path}``."""
        from cryosiam_nb.io import atomic_path, write

        if format not in ("mrc", "zarr"):
            raise _error(f"format: must be 'mrc' or 'zarr', got {format!r}")
        if table_format not in ("csv", "parquet"):
            raise _error(f"table_format: must be 'csv' or 'parquet', got {table_format!r}")
        folder = Path(folder)
        files: dict[str, str] = {}
        with atomic_path(folder, overwrite=overwrite) as tmp:
            tmp.mkdir(parents=True)
            for var in VOLUME_VARIABLES:
                name = f"{var}.{format}"
                write(self.volumes[var], tmp / name)
                if format == "mrc":
                    _fixed_mrc_label(tmp / name)
                files[var] = name
            table = f"particles.{table_format}"
            if table_format == "csv":
                self.particles.to_csv(tmp / table, index=False, float_format="%.6g")
            else:
                self.particles.to_parquet(tmp / table, index=False)
            files["particles"] = table
        return files


def _fixed_mrc_label(path: Path) -> None:
    """Replace mrcfile's time-stamped header label so equal data give equal bytes."""
    import mrcfile

    with mrcfile.mmap(path, mode="r+") as mrc:
        mrc.header.label[0] = b"cryosiam_nb.sim simulated tomogram".ljust(80)
        mrc.header.nlabl = 1


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise _error(f"shape: expected three ints (z, y, x), got {shape!r}") from exc
    if len(out) != 3 or min(out) < 16:
        raise _error(f"shape: expected three sizes (z, y, x) of at least 16 voxels, got {shape!r}")
    return out  # type: ignore[return-value]


def simulate(
    shape: Sequence[int] = (128, 256, 256),
    voxel_size: float = 10.0,
    sample: str = "general",
    seed: int = 0,
    mode: str = "tilt",
    snr: float | None = None,
    dose: float | None = None,
    defocus_um: float | None = None,
    tilt_range: float = 60.0,
    tilt_step: float = 3.0,
    thickness_nm: float | None = None,
    crowding: float | None = None,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    bfactor: float = 50.0,
    defocus_spread_um: float = 0.05,
    structures: dict[str, float] | None = None,
    orientation_pool: int | None = 64,
    keep_tilt_series: bool = True,
    progress: bool = True,
) -> Simulation:
    """Simulate one cryo-ET tomogram of a FIB-milled lamella with complete ground truth.

    Parameters
    ----------
    shape
        Volume size (z, y, x) in voxels; z is the beam direction at 0° tilt.
    voxel_size
        Å per voxel (isotropic). Species and structures have physical sizes (nm), so the
        same sample at a larger voxel size has smaller particles in voxels.
    sample
        ``"general"`` (15 species from 25 kDa to 4 MDa, vesicles and membrane sheets,
        microtubules, actin), ``"transcription"`` (70S/50S/30S-like ribosomes, RNA
        polymerase-like, DNA) or ``"chromatin"`` (worm-like-chain DNA with
        nucleosome-like particles, placed preferentially next to the DNA).
    seed
        Seeds every random choice; the same arguments and seed give identical arrays.
        Scene, imaging parameters and noise use independent streams, so changing ``snr``
        keeps the scene.
    mode
        ``"tilt"``: single-axis tilt series (±``tilt_range``° every ``tilt_step``°, tilt axis
        y), per-tilt CTF, Poisson shot noise, weighted back-projection — missing wedge and
        thickness-dependent contrast arise from the imaging. ``"fast"``: 3-D CTF, Fourier
        wedge mask and WBP-coloured noise, for tests and quick data.
    snr
        Projection SNR: ``Σ var(signal) / Σ var(noise)`` over the tilt images, signal =
        noise-free CTF-modulated projection (see :mod:`cryosiam_nb.sim.imaging`). Default
        0.1. In fast mode the volume gets the SNR a tilt series with this projection SNR
        would give (``≈ 0.07 · snr · n_tilts``, calibrated on WBP reconstructions).
    dose
        Total electron dose (e⁻/Å²) over the tilt series; when given, noise follows from it
        instead of ``snr`` (then thicker samples really are noisier).
    defocus_um
        Under-focus in µm (positive). Default: drawn uniformly in [2, 5] µm. Each tilt
        adds a Gaussian jitter of ``defocus_spread_um``.
    tilt_range, tilt_step
        Tilt range ± degrees and increment (degrees).
    thickness_nm
        Lamella thickness (nm). Default: drawn uniformly in [60, 100] nm. Capped at 85 %
        of the volume height. The slab is tilted by up to 3° and centred in z; outside it
        there is nothing but noise.
    crowding
        Target particle volume fraction of the free lamella volume (default per sample,
        0.2–0.25; max 0.8). Particles are inserted largest species first, each species
        filling an equal share, until no free position is found in 20 tries, so very high
        targets are not reached; ``params["crowding_achieved"]`` reports the fraction of
        the lamella volume that particles fill.
    voltage_kv, cs_mm, amplitude_contrast, bfactor
        Microscope: 300 kV, Cs 2.7 mm, amplitude contrast 0.07, envelope B-factor (Å²).
    structures
        Override the expected number of structures per (256 nm)² of lamella area, keys
        ``vesicles, sheets, microtubules, actin, dna`` (and ``crowding``).
    orientation_pool
        A species with more copies than this is rasterised in this many random orientations
        shared by its copies (speed); ``None`` = every copy its own orientation. The table
        always holds each copy's exact quaternion.
    keep_tilt_series
        Keep the tilt images (``Simulation.tilt_series``) in tilt mode.
    progress
        Show a progress bar.

    Returns
    -------
    Simulation
        ``.volumes`` (xarray.Dataset: clean, noisy, semantic, instances, lamella),
        ``.particles`` (DataFrame), ``.params``, ``.tilt_series``.
    """
    shape = _check_shape(shape)
    voxel_size = float(voxel_size)
    if not np.isfinite(voxel_size) or voxel_size <= 0:
        raise _error(f"voxel_size: must be a positive number of Å, got {voxel_size!r}")
    if sample not in SAMPLES:
        raise _error(f"sample: unknown sample type {sample!r}; choose one of {list(SAMPLES)}")
    if mode not in MODES:
        raise _error(f"mode: must be 'tilt' or 'fast', got {mode!r}")
    if snr is not None and dose is not None:
        raise _error("snr and dose: give one of them (dose sets the noise physically)")
    if snr is None and dose is None:
        snr = 0.1
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise _error(f"snr: must be a positive number, got {snr!r}")
    if dose is not None and not (np.isfinite(dose) and dose > 0):
        raise _error(f"dose: must be a positive number of e/Å², got {dose!r}")
    if not 0 < tilt_range < 90:
        raise _error(f"tilt_range: must be in (0, 90) degrees, got {tilt_range!r}")
    if not 0 < tilt_step <= tilt_range:
        raise _error(f"tilt_step: must be in (0, tilt_range], got {tilt_step!r}")
    if defocus_um is not None and not defocus_um > 0:
        raise _error(f"defocus_um: must be a positive under-focus in µm, got {defocus_um!r}")
    if thickness_nm is not None and not thickness_nm > 0:
        raise _error(f"thickness_nm: must be positive (nm), got {thickness_nm!r}")
    if crowding is not None and not 0 <= crowding <= 0.8:
        raise _error(f"crowding: must be a volume fraction in [0, 0.8], got {crowding!r}")
    if orientation_pool is not None and int(orientation_pool) < 1:
        raise _error(f"orientation_pool: must be >= 1 or None, got {orientation_pool!r}")

    t0 = time.perf_counter()
    ss = np.random.SeedSequence(int(seed))
    rng_par, rng_scene, rng_img = (np.random.default_rng(s) for s in ss.spawn(3))
    defocus = float(rng_par.uniform(2.0, 5.0)) if defocus_um is None else float(defocus_um)
    thick = float(rng_par.uniform(60.0, 100.0)) if thickness_nm is None else float(thickness_nm)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=3, desc=f"simulate {sample}", unit="step", leave=False)
    scene = build_scene(
        shape,
        voxel_size,
        sample,
        rng_scene,
        thick,
        crowding=crowding,
        structures=structures,
        orientation_pool=orientation_pool,
    )
    t_scene = time.perf_counter()
    if bar is not None:
        bar.update(1)

    phase = scene.clean * np.float32(
        imaging.interaction_constant(voltage_kv) * imaging.PROTEIN_POTENTIAL_V * voxel_size
    )
    n_half = int(np.floor(tilt_range / tilt_step + 1e-9))
    angles = np.arange(-n_half, n_half + 1) * float(tilt_step)
    defoci = defocus + rng_img.normal(0, defocus_spread_um, size=len(angles))
    tilt_ds = None
    realised_snr = None
    dose_px = None
    if mode == "tilt":
        ts = imaging.simulate_tilt_series(
            phase,
            voxel_size,
            angles,
            defoci * 1e4,
            rng_img,
            snr,
            dose,
            scene.info["thickness_nm"],
            scene.lamella_geometry.normal,
            voltage_kv,
            cs_mm,
            amplitude_contrast,
            bfactor,
        )
        if bar is not None:
            bar.update(1)
        raw = imaging.weighted_back_projection(ts["noisy"], ts["projector"], shape)
        realised_snr, dose_px = ts["snr"], ts["dose_per_pixel"]
        if keep_tilt_series:
            tilt_ds = xr.Dataset(
                {
                    "clean": (("tilt", "y", "x"), ts["clean"]),
                    "noisy": (("tilt", "y", "x"), ts["noisy"]),
                },
                coords={
                    "tilt": angles,
                    "y": np.arange(shape[1]) * voxel_size,
                    "x": (np.arange(ts["clean"].shape[2]) - (ts["clean"].shape[2] - shape[2]) / 2)
                    * voxel_size,
                    "defocus_um": ("tilt", defoci),
                    "transmission": ("tilt", ts["transmission"]),
                },
                attrs={"voxel_size": voxel_size, "contrast": "raw (protein dark)"},
            )
        del ts
    else:
        if snr is None:  # from dose: the projection SNR the dose would give, roughly
            snr = float(dose) * voxel_size**2 / len(angles) * 1e-4
        raw = imaging.fast_imaging(
            phase,
            voxel_size,
            defocus * 1e4,
            rng_img,
            snr_volume=_FAST_SNR_GAIN * float(snr) * len(angles),
            tilt_range=tilt_range,
            voltage_kv=voltage_kv,
            cs_mm=cs_mm,
            amplitude_contrast=amplitude_contrast,
            bfactor=bfactor,
        )
        if bar is not None:
            bar.update(1)
    noisy = imaging.percentile_normalise(-raw)
    del raw
    if bar is not None:
        bar.update(1)
        bar.close()

    params: dict[str, Any] = {
        "shape": list(shape),
        "voxel_size": voxel_size,
        "sample": sample,
        "seed": int(seed),
        "mode": mode,
        "snr": None if snr is None else float(snr),
        "snr_realised": realised_snr,
        "dose": None if dose is None else float(dose),
        "dose_per_pixel_per_tilt": dose_px,
        "defocus_um": defocus,
        "thickness_nm": scene.info["thickness_nm"],
        "thickness_nm_requested": thick,
        "tilt_range": float(tilt_range),
        "tilt_step": float(tilt_step),
        "n_tilts": int(len(angles)),
        "voltage_kv": float(voltage_kv),
        "cs_mm": float(cs_mm),
        "amplitude_contrast": float(amplitude_contrast),
        "bfactor": float(bfactor),
        "defocus_spread_um": float(defocus_spread_um),
        "lamella_normal_zyx": scene.info["lamella_normal"],
        "structures": scene.info["structures"],
        "n_particles": scene.info["n_particles"],
        "crowding_target": scene.info["crowding_target"],
        "crowding_achieved": scene.info["crowding_achieved"],
        "orientation_pool": orientation_pool,
        "seconds_scene": round(t_scene - t0, 3),
        "seconds_total": round(time.perf_counter() - t0, 3),
    }
    coords = {d: np.arange(n, dtype=np.float64) * voxel_size for d, n in zip("zyx", shape)}
    dims = ("z", "y", "x")
    vol_attrs = {"voxel_size": voxel_size}
    ds = xr.Dataset(
        {
            "clean": (dims, scene.clean, {**vol_attrs, "contrast": "protein bright"}),
            "noisy": (
                dims,
                noisy,
                {**vol_attrs, "contrast": "protein bright (inverted), percentile-normalised"},
            ),
            "semantic": (
                dims,
                scene.semantic,
                {**vol_attrs, "classes": list(SEMANTIC_CLASSES)},
            ),
            "instances": (dims, scene.instances, dict(vol_attrs)),
            "lamella": (dims, scene.lamella, dict(vol_attrs)),
        },
        coords=coords,
        attrs={
            "voxel_size": voxel_size,
            "sample": sample,
            "seed": int(seed),
            "mode": mode,
            "defocus_um": defocus,
            "thickness_nm": scene.info["thickness_nm"],
            "source": "cryosiam_nb.sim.simulate",
        },
    )
    return Simulation(volumes=ds, particles=scene.particles, params=params, tilt_series=tilt_ds)
