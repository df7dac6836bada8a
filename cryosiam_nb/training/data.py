"""Training data: tomograms in memory, per-tomogram splits, patch / crop-pair / subtomogram datasets.

A :class:`Tomogram` holds one normalised volume (float32, (z, y, x), [0, 1], protein
bright) and optional label volumes on the same grid (``semantic``, ``instances``,
``lamella``, ``clean`` …). :func:`as_tomograms` builds them from simulator output
(``cryosiam_nb.sim.Simulation`` objects or a folder written by ``sim.write_dataset``),
from user MRC/zarr files, or from numpy arrays.

All datasets are map-style ``torch.utils.data.Dataset`` whose item ``i`` is a pure
function of ``(seed, epoch, i)``: call ``set_epoch`` between epochs for new draws;
the same seed gives the same batches on every machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cryosiam_nb import pp
from cryosiam_nb.io import InputError
from cryosiam_nb.transforms import RandOverlappingCropPaird

__all__ = [
    "Tomogram",
    "as_tomograms",
    "split_tomograms",
    "PatchDataset",
    "CropPairDataset",
    "SubtomoPairDataset",
    "item_seed",
]

LABEL_KEYS = ("semantic", "instances", "lamella")


@dataclass
class Tomogram:
    """One training tomogram: ``image`` float32 (z, y, x) in [0, 1] plus label volumes.

    ``voxel_size`` in Å; ``particles`` an optional table with ``z, y, x`` centres (voxels)."""

    name: str
    image: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    voxel_size: float | None = None
    particles: Any = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise InputError(
                f"tomogram {self.name!r}: image must be 3-D (z, y, x), got shape {self.image.shape}"
            )
        for k, v in self.labels.items():
            if v.shape != self.image.shape:
                raise InputError(
                    f"tomogram {self.name!r}: label {k!r} has shape {v.shape}, "
                    f"image has {self.image.shape}"
                )


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 31-bit seed derived from (seed, epoch, index), stable across platforms."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def _normalise(x: np.ndarray) -> np.ndarray:
    """In-memory volume clipped at the 0.1/99.9 percentiles and scaled to [0, 1] (float32).

    The same normalisation as inference input: :func:`cryosiam_nb.pp.normalize` with
    ``invert=False`` (training volumes are already protein-bright).
    """
    return np.asarray(pp.normalize(np.asarray(x, np.float32), invert=False).values)


def _load_volume(src: Any, what: str) -> tuple[np.ndarray, float | None]:
    """Array + voxel size (Å or None) from a path (MRC/zarr), DataArray or array."""
    if isinstance(src, (str, os.PathLike)):
        from cryosiam_nb import io

        arr = io.read(src)
        return np.asarray(arr.values), float(arr.attrs.get("voxel_size", 0)) or None
    if hasattr(src, "dims") and hasattr(src, "values"):
        vs = getattr(src, "attrs", {}).get("voxel_size")
        return np.asarray(src.values), (float(vs) if vs else None)
    arr = np.asarray(src)
    if arr.ndim != 3:
        raise InputError(f"{what}: expected a 3-D (z, y, x) array, got shape {arr.shape}")
    return arr, None


def _from_simulation(sim: Any, name: str, image: str, normalise: bool) -> Tomogram:
    ds = sim.volumes
    if image not in ds:
        raise InputError(f"simulation {name!r} has no volume {image!r}; has {list(ds.data_vars)}")
    img = np.asarray(ds[image].values, dtype=np.float32)
    img = _normalise(img) if normalise else img
    labels = {}
    for k in ds.data_vars:
        if k == image:
            continue
        v = np.asarray(ds[k].values)
        labels[k] = _normalise(v) if k in ("clean", "noisy") else v
    vs = ds.attrs.get("voxel_size")
    return Tomogram(name, img, labels, float(vs) if vs else None, getattr(sim, "particles", None))


def _read_sim_folder(folder: Path, image: str, normalise: bool) -> list[Tomogram]:
    """Tomograms from a folder written by ``cryosiam_nb.sim.write_dataset``."""
    from cryosiam_nb import sim as sim_mod

    reader = getattr(sim_mod, "read_dataset", None) or getattr(sim_mod, "load_dataset", None)
    if reader is not None:
        return [
            _from_simulation(s, getattr(s, "name", f"tomo{i:03d}"), image, normalise)
            for i, s in enumerate(reader(folder))
        ]
    return _scan_folder(folder, image, normalise)


def _scan_folder(folder: Path, image: str, normalise: bool) -> list[Tomogram]:
    """Generic layout: one sub-folder (or zarr store) per tomogram holding ``<var>.mrc`` /
    ``<var>.zarr`` volumes, or files named ``<tomo>_<var>.mrc``."""
    import xarray as xr

    tomos: list[Tomogram] = []
    stores = sorted(p for p in folder.iterdir() if p.suffix == ".zarr" and p.is_dir())
    for st in stores:
        try:
            ds = xr.open_zarr(st)
        except Exception:  # noqa: BLE001 - not a Dataset store; skip it
            continue

        class _S:  # minimal Simulation-like view
            volumes = ds
            particles = None

        tomos.append(_from_simulation(_S, st.stem, image, normalise))
    if tomos:
        return tomos
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in (".mrc", ".rec", ".zarr") or not (p.is_file() or p.is_dir()):
            continue
        if p.parent != folder:
            groups.setdefault(p.parent.name, {})[p.stem] = p
        elif "_" in p.stem:
            tomo, var = p.stem.rsplit("_", 1)
            groups.setdefault(tomo, {})[var] = p
    for name, files in groups.items():
        if image not in files:
            continue
        spec = {"image": files[image], **{k: v for k, v in files.items() if k != image}}
        tomos.append(_from_dict(spec, name, normalise, image_is_clean=(image == "clean")))
    if not tomos:
        raise InputError(f"{folder}: found no tomograms with a {image!r} volume")
    return tomos


def _from_dict(
    spec: Mapping[str, Any], name: str, normalise: bool, image_is_clean=False
) -> Tomogram:
    if "image" not in spec:
        raise InputError(f"tomogram {name!r}: the dict needs an 'image' entry, got {list(spec)}")
    img, vs = _load_volume(spec["image"], f"{name}: image")
    img = _normalise(img) if normalise else img.astype(np.float32)
    labels: dict[str, np.ndarray] = {}
    for k, v in spec.items():
        if k in ("image", "name", "voxel_size"):
            continue
        arr, _ = _load_volume(v, f"{name}: {k}")
        labels[k] = _normalise(arr) if k in ("clean", "noisy") else arr
    if spec.get("voxel_size") is not None:
        vs = float(spec["voxel_size"])
    return Tomogram(str(spec.get("name", name)), img, labels, vs)


def as_tomograms(data: Any, image: str = "noisy", normalise: bool = True) -> list[Tomogram]:
    """Training tomograms from simulator output or user volumes.

    Parameters
    ----------
    data
        One of: a list of ``Tomogram``; a ``cryosiam_nb.sim.Simulation`` or a list of them;
        a folder written by ``cryosiam_nb.sim.write_dataset``; a list of dicts
        ``{"image": path|array, "semantic": path|array, ..., "voxel_size": Å}`` (user MRC
        or zarr volumes: ``image`` must already be protein-bright — use
        ``cryosiam_nb.pp.normalize(invert=True)`` first for raw data).
    image
        For simulations: which volume is the network input (``"noisy"`` or ``"clean"``);
        the others become targets/labels.
    normalise
        Clip inputs (and ``clean`` / ``noisy`` targets) at the 0.1/99.9 percentiles and
        scale to [0, 1] with :func:`cryosiam_nb.pp.normalize` (``invert=False``), exactly as
        inference input is normalised.

    Returns
    -------
    list of Tomogram
        In memory; volumes (z, y, x), voxel size in Å (``None`` when unknown).
    """
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.exists():
            raise InputError(f"{p}: no such training data folder")
        return _read_sim_folder(p, image, normalise)
    if hasattr(data, "volumes"):
        data = [data]
    if isinstance(data, Tomogram):
        data = [data]
    if not isinstance(data, Iterable):
        raise InputError(f"training data: unsupported type {type(data).__name__}")
    out: list[Tomogram] = []
    for i, item in enumerate(data):
        if isinstance(item, Tomogram):
            out.append(item)
        elif hasattr(item, "volumes"):
            out.append(
                _from_simulation(item, getattr(item, "name", f"tomo{i:03d}"), image, normalise)
            )
        elif isinstance(item, Mapping):
            out.append(_from_dict(item, f"tomo{i:03d}", normalise))
        else:
            raise InputError(f"training data item {i}: unsupported type {type(item).__name__}")
    if not out:
        raise InputError("training data: no tomograms given")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        for i, t in enumerate(out):
            t.name = f"{t.name}#{i}"
    return out


def split_tomograms(
    names: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split tomogram names into (train, validation), whole tomograms only.

    Deterministic for a seed and independent of the input order; at least one
    validation tomogram when there are ≥ 2 tomograms and ``val_fraction > 0``."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    uniq = sorted(set(names))
    if len(uniq) != len(names):
        raise InputError("split_tomograms: tomogram names must be unique")
    n_val = int(round(val_fraction * len(uniq)))
    if val_fraction > 0 and len(uniq) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(uniq) - 1)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    val = sorted(uniq[i] for i in perm[:n_val])
    train = sorted(uniq[i] for i in perm[n_val:])
    return train, val


def _size3(s: int | Sequence[int], what: str) -> tuple[int, int, int]:
    t = (int(s),) * 3 if isinstance(s, (int, np.integer)) else tuple(int(v) for v in s)
    if len(t) != 3 or min(t) < 1:
        raise InputError(f"{what} must be a positive int or 3 ints (z, y, x), got {s!r}")
    return t  # type: ignore[return-value]


class _SeededDataset(Dataset):
    def __init__(self, n_samples: int, seed: int):
        if n_samples < 1:
            raise InputError(f"n_samples must be >= 1, got {n_samples}")
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new samples for ``epoch`` (deterministic given the seed)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(item_seed(self.seed, self.epoch, index))


def _pick_corner(
    rng: np.random.Generator,
    shape: Sequence[int],
    size: Sequence[int],
    focus: np.ndarray | None,
) -> tuple[int, ...]:
    if any(s < c for s, c in zip(shape, size)):
        raise InputError(f"patch size {tuple(size)} is larger than the tomogram {tuple(shape)}")
    if focus is not None and len(focus):
        c = focus[rng.integers(len(focus))]
        return tuple(
            int(np.clip(ci - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, s - p))
            for ci, p, s in zip(c, size, shape)
        )
    return tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, size))


class PatchDataset(_SeededDataset):
    """Random patches ``(1, P, P, P)`` from tomograms, for fine-tuning heads.

    Items: ``{"image": float32 (1, *P)}`` plus one tensor per name in ``keys``
    (``clean``: float32; label volumes: int64). ``foreground_fraction`` of the
    patches are centred near a voxel of ``foreground_key`` > 0; with ``balance=True``
    near a voxel of a class drawn uniformly among the classes > 0 present in any
    tomogram (rare classes are seen as often as common ones)."""

    def __init__(
        self,
        tomograms: Sequence[Tomogram],
        patch_size: int | Sequence[int],
        n_samples: int,
        keys: Sequence[str] = (),
        transform: Any = None,
        seed: int = 0,
        foreground_key: str | None = None,
        foreground_fraction: float = 0.5,
        balance: bool = False,
    ):
        super().__init__(n_samples, seed)
        self.tomograms = list(tomograms)
        if not self.tomograms:
            raise InputError("PatchDataset: no tomograms")
        self.patch_size = _size3(patch_size, "patch_size")
        self.keys = tuple(keys)
        for t in self.tomograms:
            for k in self.keys:
                if k not in t.labels:
                    raise InputError(
                        f"tomogram {t.name!r} has no {k!r} volume (has {list(t.labels)})"
                    )
        self.transform = transform
        self.foreground_fraction = float(foreground_fraction)
        self._focus: list[np.ndarray | None] = []
        for t in self.tomograms:
            if foreground_key and foreground_key in t.labels:
                pts = np.argwhere(t.labels[foreground_key] > 0)
                if len(pts) > 20000:
                    pts = pts[np.random.default_rng(seed).choice(len(pts), 20000, replace=False)]
                self._focus.append(pts)
            else:
                self._focus.append(None)
        # class → [(tomogram index, voxels of that class)], for balanced sampling
        self._by_class: dict[int, list[tuple[int, np.ndarray]]] = {}
        if balance and foreground_key:
            rng = np.random.default_rng(seed)
            for ti, t in enumerate(self.tomograms):
                lab = t.labels.get(foreground_key)
                if lab is None:
                    continue
                for c in np.unique(lab):
                    if c <= 0:
                        continue
                    pts = np.argwhere(lab == c)
                    if len(pts) > 5000:
                        pts = pts[rng.choice(len(pts), 5000, replace=False)]
                    self._by_class.setdefault(int(c), []).append((ti, pts))

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        ti = int(rng.integers(len(self.tomograms)))
        focus = self._focus[ti] if rng.random() < self.foreground_fraction else None
        if focus is not None and self._by_class:
            classes = sorted(self._by_class)
            holders = self._by_class[classes[int(rng.integers(len(classes)))]]
            ti, focus = holders[int(rng.integers(len(holders)))]
        t = self.tomograms[ti]
        c = _pick_corner(rng, t.image.shape, self.patch_size, focus)
        sl = tuple(slice(a, a + p) for a, p in zip(c, self.patch_size))
        d: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(t.image[sl])[None].copy())
        }
        for k in self.keys:
            v = np.ascontiguousarray(t.labels[k][sl])[None]
            d[k] = torch.from_numpy(
                v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v.astype(np.int64)
            )
        if self.transform is not None:
            self.transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
            d = dict(self.transform(d))
        return d


class CropPairDataset(_SeededDataset):
    """DenseSimSiam input pairs: a random region of ``region_size`` voxels, two
    overlapping crops of ``crop_size`` (:class:`~cryosiam_nb.transforms.RandOverlappingCropPaird`),
    each passed through its own draw of ``view_transform``.

    Items: ``{"view_1", "view_2": float32 (1, *crop), "box_1", "box_2": int64 (3, 2)}``
    with boxes ``[[z0, z1], [y0, y1], [x0, x1]]`` in region coordinates."""

    def __init__(
        self,
        tomograms: Sequence[Tomogram],
        region_size: int | Sequence[int],
        crop_size: int | Sequence[int],
        n_samples: int,
        view_transform: Any = None,
        min_overlap: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(n_samples, seed)
        self.tomograms = list(tomograms)
        if not self.tomograms:
            raise InputError("CropPairDataset: no tomograms")
        self.region_size = _size3(region_size, "region_size")
        self.crop_size = _size3(crop_size, "crop_size")
        if any(c > r for c, r in zip(self.crop_size, self.region_size)):
            raise InputError(f"crop_size {self.crop_size} exceeds region_size {self.region_size}")
        self.pair = RandOverlappingCropPaird("image", self.crop_size, min_overlap=min_overlap)
        self.view_transform = view_transform

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        t = self.tomograms[int(rng.integers(len(self.tomograms)))]
        c = _pick_corner(rng, t.image.shape, self.region_size, None)
        sl = tuple(slice(a, a + p) for a, p in zip(c, self.region_size))
        region = torch.from_numpy(np.ascontiguousarray(t.image[sl])[None].copy())
        self.pair.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        d = self.pair({"image": region})
        out: dict[str, Any] = {}
        for i in (1, 2):
            v = d[f"image_{i}"]
            if self.view_transform is not None:
                self.view_transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
                v = self.view_transform({"image": v})["image"]
            if hasattr(v, "as_tensor"):
                v = v.as_tensor()
            out[f"view_{i}"] = torch.as_tensor(v, dtype=torch.float32).contiguous()
            out[f"box_{i}"] = torch.as_tensor(d[f"box_{i}"], dtype=torch.int64)
        return out


class SubtomoPairDataset(_SeededDataset):
    """SimSiam input pairs from subtomograms ``(N, B, B, B)``: two independent
    draws of ``view_transform`` (e.g. :func:`~cryosiam_nb.transforms.subtomo_view_transform`).

    Items: ``{"view_1", "view_2": float32 (1, B, B, B), "index": int}`` (+ ``label``
    when ``labels`` are given)."""

    def __init__(
        self,
        subtomograms: np.ndarray,
        view_transform: Any,
        n_samples: int | None = None,
        labels: Sequence[int] | None = None,
        seed: int = 0,
    ):
        sub = np.asarray(subtomograms, dtype=np.float32)
        if sub.ndim != 4 or len(sub) == 0:
            raise InputError(
                f"subtomograms must be (N, B, B, B) with N >= 1, got shape {sub.shape}"
            )
        super().__init__(n_samples or len(sub), seed)
        self.sub = sub
        self.view_transform = view_transform
        self.labels = None if labels is None else np.asarray(labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        j = (
            int(index % len(self.sub))
            if self.n_samples == len(self.sub)
            else int(rng.integers(len(self.sub)))
        )
        x = torch.from_numpy(self.sub[j][None].copy())
        out: dict[str, Any] = {"index": j}
        for i in (1, 2):
            self.view_transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
            v = self.view_transform({"image": x})["image"]
            if hasattr(v, "as_tensor"):
                v = v.as_tensor()
            out[f"view_{i}"] = torch.as_tensor(v, dtype=torch.float32).contiguous()
        if self.labels is not None:
            out["label"] = int(self.labels[j])
        return out
