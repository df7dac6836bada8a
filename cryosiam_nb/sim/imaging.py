"""Image formation: CTF, single-axis tilt series with shot noise, weighted back-projection,
and a fast Fourier-space approximation.

Conventions
-----------
- Volumes are (z, y, x); the beam is along z at 0° tilt; the tilt axis is y.
- Frequencies are in 1/Å. Defocus is positive for under-focus, in Å internally (µm in the
  public API).
- The object is a weak phase object: phase (rad) = σ · ΔV · path length, with
  ``clean`` = 1 meaning a protein-like potential ``PROTEIN_POTENTIAL_V`` above the ice.
  A uniform ice slab only adds a constant to each projection (removed by the ramp
  filter), but it attenuates the beam: each tilt transmits ``exp(-t / (cos θ · λ_in))``
  (``t`` the lamella thickness, ``λ_in`` the inelastic mean free path), which lowers the
  dose-limited signal at high tilt and in thick samples.
- Image contrast ``C = 2 · F⁻¹{CTF · F{phase}}`` with
  ``CTF(k) = −(√(1−A²) sin χ(k) + A cos χ(k)) · exp(−B k²/4)``,
  ``χ(k) = π λ Δf k² − (π/2) Cs λ³ k⁴``: protein is *dark* in raw images, as in real
  cryo-ET.

SNR (``snr`` argument, tilt mode)
---------------------------------
``snr = Σ_i var(S_i) / Σ_i var(N_i)`` over the tilt images ``i``, where ``S_i`` is the
noise-free contrast image (``C`` above, variance over detector pixels) and
``N_i = noisy_i − S_i`` its shot noise. Noise is Poisson: the incident dose per pixel is
chosen so that the expected ratio is exactly ``snr``; the realised ratio is returned.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy import sparse

__all__ = [
    "electron_wavelength",
    "interaction_constant",
    "ctf",
    "tilt_projector",
    "detector_width",
    "ramp_filter",
    "simulate_tilt_series",
    "weighted_back_projection",
    "fast_imaging",
    "missing_wedge_mask",
    "percentile_normalise",
    "PROTEIN_POTENTIAL_V",
    "INELASTIC_MFP_NM",
]

#: Mean inner potential of protein above vitreous ice (V) for ``clean == 1``.
PROTEIN_POTENTIAL_V = 2.0
#: Inelastic mean free path at 300 kV (nm), used for thickness-dependent attenuation.
INELASTIC_MFP_NM = 350.0
_WORKERS = 2


def electron_wavelength(voltage_kv: float = 300.0) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643 / np.sqrt(v * (1 + 0.978466e-6 * v))


def interaction_constant(voltage_kv: float = 300.0) -> float:
    """Interaction constant σ in rad / (V · Å)."""
    v = voltage_kv * 1e3
    lam = electron_wavelength(voltage_kv)
    mc2 = 510998.95  # eV
    return float(2 * np.pi / (lam * v) * (mc2 + v) / (2 * mc2 + v))


def ctf(
    k: np.ndarray,
    defocus_a: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    bfactor: float = 0.0,
) -> np.ndarray:
    """Contrast transfer function at spatial frequency ``k`` (1/Å); ``defocus_a`` in Å
    (positive = under-focus). Negative at low frequency: protein dark."""
    lam = electron_wavelength(voltage_kv)
    cs = cs_mm * 1e7
    k2 = np.asarray(k, dtype=np.float64) ** 2
    chi = np.pi * lam * defocus_a * k2 - 0.5 * np.pi * cs * lam**3 * k2 * k2
    a = amplitude_contrast
    out = -(np.sqrt(1 - a * a) * np.sin(chi) + a * np.cos(chi))
    if bfactor:
        out = out * np.exp(-bfactor * k2 / 4)
    return out


def detector_width(nz: int, nx: int, angles_deg: np.ndarray) -> int:
    """Detector pixels (along x) that see the whole (z, x) extent of the volume at every tilt."""
    th = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    w = np.max((nx - 1) * np.abs(np.cos(th)) + (nz - 1) * np.abs(np.sin(th)))
    extra = max(0, int(np.ceil((w - (nx - 1)) / 2))) + 1  # same parity as nx: 0° is exact
    return int(nx + 2 * extra)


def tilt_projector(nz: int, nx: int, angles_deg: np.ndarray, n_det: int) -> sparse.csr_matrix:
    """Sparse line-integral projector for tilts about the y axis.

    Maps a (z, x) plane flattened as ``z * nx + x`` to detector rows ``tilt * n_det + u``
    (linear interpolation onto the detector). Its transpose is the back-projector. The same
    matrix applies to every y row, so a whole volume projects with one sparse product.
    """
    th = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    z = np.arange(nz) - (nz - 1) / 2
    x = np.arange(nx) - (nx - 1) / 2
    zz, xx = np.meshgrid(z, x, indexing="ij")
    cols = (np.arange(nz)[:, None] * nx + np.arange(nx)[None, :]).ravel()
    rows_all, cols_all, vals_all = [], [], []
    for t, a in enumerate(th):
        u = (xx * np.cos(a) + zz * np.sin(a)).ravel() + (n_det - 1) / 2
        i0 = np.floor(u).astype(np.int64)
        w1 = (u - i0).astype(np.float32)
        for i, w in ((i0, 1 - w1), (i0 + 1, w1)):
            ok = (i >= 0) & (i < n_det) & (w > 0)
            rows_all.append(t * n_det + i[ok])
            cols_all.append(cols[ok])
            vals_all.append(w[ok])
    mat = sparse.coo_matrix(
        (np.concatenate(vals_all), (np.concatenate(rows_all), np.concatenate(cols_all))),
        shape=(len(th) * n_det, nz * nx),
        dtype=np.float32,
    )
    return mat.tocsr()


def ramp_filter(n: int, window: str = "hann") -> np.ndarray:
    """Discrete ramp (Ram-Lak) filter of length ``2n`` (zero-padded FFT), optionally
    apodised (``"hann"`` or ``"none"``), for ``scipy.fft.rfft`` of padded rows."""
    m = 2 * n
    idx = np.concatenate([np.arange(0, m // 2 + 1), np.arange(-m // 2 + 1, 0)])
    h = np.zeros(m)
    h[0] = 0.25
    odd = idx % 2 == 1
    h[odd] = -1.0 / (np.pi * idx[odd]) ** 2
    filt = np.real(sfft.rfft(h)) * 2
    if window == "hann":
        f = np.linspace(0, 1, len(filt))
        filt = filt * 0.5 * (1 + np.cos(np.pi * f))
    elif window != "none":
        raise ValueError(f"window: unknown apodisation {window!r}; use 'hann' or 'none'")
    return filt.astype(np.float32)


def _project(vol: np.ndarray, proj: sparse.csr_matrix, n_t: int, n_det: int) -> np.ndarray:
    nz, ny, nx = vol.shape
    flat = np.ascontiguousarray(vol.transpose(0, 2, 1)).reshape(nz * nx, ny)
    p = proj @ flat  # (n_t * n_det, ny)
    return np.ascontiguousarray(p.reshape(n_t, n_det, ny).transpose(0, 2, 1))


def weighted_back_projection(
    images: np.ndarray,
    proj: sparse.csr_matrix,
    shape: tuple[int, int, int],
    window: str = "hann",
) -> np.ndarray:
    """Ramp-filter each image along x (the axis ⟂ to the tilt axis) and back-project.

    ``images`` (n_tilts, ny, n_det); ``proj`` from :func:`tilt_projector`. Returns a
    float32 (z, y, x) volume.
    """
    n_t, ny, n_det = images.shape
    nz, _, nx = shape
    filt = ramp_filter(n_det, window)
    f = sfft.rfft(images, n=2 * n_det, axis=2, workers=_WORKERS)
    f *= filt
    q = sfft.irfft(f, n=2 * n_det, axis=2, workers=_WORKERS)[:, :, :n_det].astype(np.float32)
    q = np.ascontiguousarray(q.transpose(0, 2, 1)).reshape(n_t * n_det, ny)
    rec = proj.T.tocsr() @ q  # (nz * nx, ny)
    rec *= np.float32(np.pi / (2 * n_t))
    return np.ascontiguousarray(rec.reshape(nz, nx, ny).transpose(0, 2, 1)).astype(np.float32)


def _freq_grid_2d(ny: int, nx: int, voxel_size: float) -> np.ndarray:
    ky = sfft.fftfreq(ny, d=voxel_size)[:, None]
    kx = sfft.rfftfreq(nx, d=voxel_size)[None, :]
    return np.sqrt(ky**2 + kx**2)


def simulate_tilt_series(
    phase: np.ndarray,
    voxel_size: float,
    angles_deg: np.ndarray,
    defocus_a: np.ndarray,
    rng: np.random.Generator,
    snr: float | None,
    dose: float | None,
    thickness_nm: float,
    lamella_normal: np.ndarray,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    bfactor: float = 0.0,
    proj: sparse.csr_matrix | None = None,
) -> dict:
    """Project, apply a per-tilt CTF and Poisson noise.

    The detector is wide enough (:func:`detector_width`) to see the whole volume at every
    tilt, so the reconstruction has no truncation artefacts at the x edges.

    ``phase`` (z, y, x) in rad per voxel; ``defocus_a`` per tilt (Å); ``dose`` total
    electrons/Å² over the series (overrides ``snr``). Returns a dict with ``clean``
    (noise-free contrast images), ``noisy`` (normalised images − 1), ``snr`` (realised),
    ``dose_per_pixel`` (per tilt), ``transmission`` (per tilt) and ``projector``.
    """
    nz, ny, nx = phase.shape
    n_t, n_det = len(angles_deg), detector_width(nz, nx, angles_deg)
    if proj is None:
        proj = tilt_projector(nz, nx, angles_deg, n_det)
    p = _project(phase, proj, n_t, n_det)  # (n_t, ny, n_det)
    k = _freq_grid_2d(ny, n_det, voxel_size)
    f = sfft.rfft2(p, workers=_WORKERS)
    for i in range(n_t):
        f[i] *= 2 * ctf(k, defocus_a[i], voltage_kv, cs_mm, amplitude_contrast, bfactor)
    contrast = sfft.irfft2(f, s=(ny, n_det), workers=_WORKERS).astype(np.float32)
    # beam path through the (tilted) lamella: thicker at high tilt -> fewer electrons
    th = np.deg2rad(np.asarray(angles_deg))
    beam = np.stack([np.cos(th), np.zeros_like(th), -np.sin(th)], 1)  # (z, y, x)
    cos_eff = np.clip(np.abs(beam @ np.asarray(lamella_normal)), 0.2, 1.0)
    transmission = np.exp(-thickness_nm / (cos_eff * INELASTIC_MFP_NM))
    intensity = np.clip(1.0 + contrast, 0.0, None)
    var_s = contrast.reshape(n_t, -1).var(1)
    mean_i = intensity.reshape(n_t, -1).mean(1)
    if dose is not None:
        d_px = float(dose) / n_t * voxel_size**2
    else:
        d_px = float(snr) * float(np.sum(mean_i / transmission)) / max(float(var_s.sum()), 1e-30)
    lam = intensity * (d_px * transmission)[:, None, None]
    counts = rng.poisson(lam).astype(np.float32)
    noisy = counts / (d_px * transmission)[:, None, None].astype(np.float32) - 1.0
    noise = noisy - contrast
    realised = float(var_s.sum() / max(noise.reshape(n_t, -1).var(1).sum(), 1e-30))
    return {
        "clean": contrast,
        "noisy": noisy.astype(np.float32),
        "snr": realised,
        "dose_per_pixel": d_px,
        "transmission": transmission,
        "projector": proj,
    }


def missing_wedge_mask(
    shape: tuple[int, int, int], tilt_range: float, rfft: bool = True
) -> np.ndarray:
    """Boolean Fourier mask of the frequencies a ±``tilt_range``° single-axis (y) tilt
    series samples: ``|kz| <= tan(tilt_range) · |kx|`` (plus the ky axis). ``rfft``:
    last axis halved as in ``scipy.fft.rfftn``."""
    nz, ny, nx = shape
    kz = sfft.fftfreq(nz)[:, None, None]
    kx = (sfft.rfftfreq(nx) if rfft else sfft.fftfreq(nx))[None, None, :]
    t = np.tan(np.deg2rad(tilt_range))
    m = np.abs(kz) <= t * np.abs(kx) + 1e-12
    m = m | ((kz == 0) & (kx == 0))
    return np.broadcast_to(m, (nz, ny, m.shape[2])).copy()


def fast_imaging(
    phase: np.ndarray,
    voxel_size: float,
    defocus_a: float,
    rng: np.random.Generator,
    snr_volume: float,
    tilt_range: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    bfactor: float = 0.0,
) -> np.ndarray:
    """3-D CTF + missing-wedge mask + noise, all in Fourier space (raw contrast).

    Noise has the power spectrum of a weighted back-projection (∝ |k_xz|, Hann window) in
    the sampled wedge; ``snr_volume`` = var(signal) / var(noise) in the output volume.
    """
    nz, ny, nx = phase.shape
    f = sfft.rfftn(phase, workers=_WORKERS)
    kz = sfft.fftfreq(nz, d=voxel_size)[:, None, None]
    ky = sfft.fftfreq(ny, d=voxel_size)[None, :, None]
    kx = sfft.rfftfreq(nx, d=voxel_size)[None, None, :]
    k = np.sqrt(kz**2 + ky**2 + kx**2)
    wedge = missing_wedge_mask(phase.shape, tilt_range)
    f *= (2 * ctf(k, defocus_a, voltage_kv, cs_mm, amplitude_contrast, bfactor)).astype(
        np.float32
    ) * wedge
    signal = sfft.irfftn(f, s=phase.shape, workers=_WORKERS).astype(np.float32)
    del f
    kxz = np.sqrt(kz**2 + kx**2) * voxel_size * 2  # 0 .. ~1.4 (Nyquist = 1)
    shape_f = np.sqrt(kxz) * 0.5 * (1 + np.cos(np.pi * np.clip(kxz, 0, 1)))
    white = rng.standard_normal(phase.shape, dtype=np.float32)
    nf = sfft.rfftn(white, workers=_WORKERS)
    nf *= (shape_f * wedge).astype(np.float32)
    noise = sfft.irfftn(nf, s=phase.shape, workers=_WORKERS).astype(np.float32)
    scale = np.sqrt(signal.var() / max(float(noise.var()) * snr_volume, 1e-30))
    return signal + noise * np.float32(scale)


def percentile_normalise(vol: np.ndarray, lo: float = 0.1, hi: float = 99.9) -> np.ndarray:
    """Clip at the ``lo``/``hi`` percentiles and scale to [0, 1] (float32)."""
    sample = vol.reshape(-1)[:: max(1, vol.size // 2_000_000)]
    a, b = np.percentile(sample, [lo, hi])
    out = (vol - np.float32(a)) / np.float32(max(b - a, 1e-12))
    return np.clip(out, 0.0, 1.0).astype(np.float32)
