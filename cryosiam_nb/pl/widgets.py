"""Move a slider instead of editing a number: ipywidgets tuners with a live slice preview.

- :func:`tune_instances`: the post-processing of ``tl.instances`` (foreground threshold,
  seed distances, boundary bias, neck distance, minimum size, multicut) on a crop of the
  instance maps, with the particle count and a slice of the labels updating as a slider
  moves.
- :func:`tune_lamella`: the threshold and smoothing of ``tl.lamella_mask`` on a crop of the
  lamella probabilities, with xy / xz slices of the mask, its volume fraction and (given
  instance labels) the number of particles inside it.

Each tuner displays itself in Jupyter; ``tuner.params`` are the current keyword arguments;
``tuner.apply()`` runs the tool on the **whole** tomogram (result in ``tuner.result``) and
returns the parameters, ready for ``tl.instances(maps, **params)`` /
``tl.lamella_mask(probs, **params)`` or ``workflow.run_dataset(instance_params=...,
lamella_params=...)``. Arrays are (z, y, x); sizes and distances in voxels.

Progress bars elsewhere use ``tqdm.auto``, which draws ipywidgets bars in Jupyter once
ipywidgets is installed (the ``[jupyter]`` extra).
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.colors import ListedColormap

from cryosiam_nb.constants import DIMS, INSTANCE_COLORS
from cryosiam_nb.inference import lamella_mask, outputs_of
from cryosiam_nb.io import InputError, as_volume
from cryosiam_nb.pl.static import Figure
from cryosiam_nb.segmentation import instances as _instances

__all__ = ["InstanceTuner", "LamellaTuner", "tune_instances", "tune_lamella", "INSTANCE_SLIDERS"]

#: the ``tl.instances`` parameters :class:`InstanceTuner` has a slider / checkbox for (its
#: start values are ``tl.instances``' defaults); the other parameters are not tuning knobs
#: (``tests/test_widgets.py`` fails when ``tl.instances`` gains one not listed either way)
INSTANCE_SLIDERS: tuple[str, ...] = (
    "threshold_foreground",
    "min_center_distance",
    "max_center_distance",
    "boundary_bias",
    "neck_distance",
    "min_size",
    "multicut",
    "average_edt",
)

Crop = Mapping[str, slice] | Sequence[slice] | int | None


def _crop(shape: Sequence[int], crop: Crop, default: Sequence[int]) -> dict[str, slice]:
    """Slices (z, y, x) of ``crop``: slices as given, an int edge or ``default`` edges,
    centred in the volume and clipped to it (voxels)."""
    if isinstance(crop, Mapping):
        crop = [crop.get(d, slice(None)) for d in DIMS]
    if crop is None or isinstance(crop, int | np.integer):
        edges = default if crop is None else (int(crop),) * 3
        if min(edges) < 1:
            raise InputError(f"crop: the edge must be >= 1 voxel, got {crop}")
        out = {}
        for d, n, e in zip(DIMS, shape, edges):
            e = min(int(e), int(n))
            start = (int(n) - e) // 2
            out[d] = slice(start, start + e)
        return out
    sl = list(crop)
    if len(sl) != 3 or not all(isinstance(s, slice) for s in sl):
        raise InputError(f"crop: expected 3 slices (z, y, x), an int edge or None, got {crop}")
    out = {d: slice(*s.indices(int(n))[:2]) for d, s, n in zip(DIMS, sl, shape)}
    if any(s.stop - s.start < 1 for s in out.values()):
        raise InputError(f"crop: empty crop {crop} of a volume of shape {tuple(shape)}")
    return out


def _cut(volume: Any, crop: dict[str, slice], name: str) -> np.ndarray:
    vol = as_volume(volume, name)
    part = vol[crop["z"], crop["y"], crop["x"]]
    return np.asarray(part.compute() if hasattr(part, "compute") else part)


def _label_cmap() -> ListedColormap:
    return ListedColormap(list(INSTANCE_COLORS))


class _Tuner:
    """Shared machinery: sliders → recompute on the crop → PNG preview in an Output."""

    #: parameter name → slider (set by subclasses)
    sliders: dict[str, Any]

    def __init__(self, title: str) -> None:
        import ipywidgets as w

        self._w = w
        self.output = w.Output(layout=w.Layout(min_height="260px"))
        self.status = w.HTML()
        self.apply_button = w.Button(description="apply to whole tomogram", icon="check")
        self.apply_button.layout.width = "220px"
        self.apply_button.on_click(lambda _b: self.apply())
        self.title = w.HTML(f"<b>{title}</b>")
        self.figure: Figure | None = None
        self.result: Any = None
        self.n_updates = 0

    def _finish(self, z_size: int) -> None:
        w = self._w
        self.z = w.IntSlider(
            value=z_size // 2, min=0, max=z_size - 1, description="z slice", continuous_update=False
        )
        for s in self.sliders.values():
            s.observe(self._on_param, names="value")
        self.z.observe(lambda _c: self._draw(), names="value")
        controls = w.VBox([*self.sliders.values(), self.z, self.apply_button])
        self.widget = w.VBox([self.title, w.HBox([controls, self.output]), self.status])
        self._recompute()

    def _on_param(self, _change: Any) -> None:
        self._recompute()

    @property
    def params(self) -> dict[str, Any]:
        """The current keyword arguments of the tool (slider values)."""
        return {k: s.value for k, s in self.sliders.items()}

    def _show(self, fig: Figure, text: str) -> None:
        self.figure = fig
        png = base64.b64encode(fig._repr_png_()).decode()
        self.output.outputs = (
            {
                "output_type": "display_data",
                "data": {"image/png": png, "text/plain": text},
                "metadata": {},
            },
        )
        self.n_updates += 1

    def _recompute(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _draw(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


class InstanceTuner(_Tuner):
    """Tune ``tl.instances`` on a crop of the maps; see :func:`tune_instances`."""

    def __init__(
        self,
        maps: xr.Dataset,
        *,
        tomogram: Any = None,
        roi: Any = None,
        crop: Crop = None,
        progress: bool = True,
        **initial: Any,
    ) -> None:
        if isinstance(maps, xr.Dataset) and maps.attrs.get("task") == "multitask":
            maps = outputs_of(maps, "instance")  # the instance head of a one-pass prediction
        if not isinstance(maps, xr.Dataset) or not {"foreground", "boundary", "distance"} <= set(
            maps.data_vars
        ):
            raise InputError("maps: expected a Dataset with foreground, boundary and distance")
        super().__init__("instance post-processing (tl.instances) on a crop")
        shape = maps["foreground"].shape
        self.maps, self.roi, self.progress = maps, roi, progress
        self.crop = _crop(shape, crop, (64, 128, 128))
        self._maps = maps.isel(self.crop).compute()
        self._roi = None if roi is None else _cut(roi, self.crop, "roi").astype(bool)
        bg = tomogram if tomogram is not None else maps["foreground"]
        self._background = _cut(bg, self.crop, "tomogram").astype(np.float32)
        unknown = sorted(set(initial) - set(INSTANCE_SLIDERS))
        if unknown:
            raise InputError(
                f"tune_instances: unknown parameter(s) {unknown}; known: {INSTANCE_SLIDERS}"
            )
        # start values: tl.instances' own defaults, then ``initial``
        sig = inspect.signature(_instances).parameters
        v = {**{k: sig[k].default for k in INSTANCE_SLIDERS}, **initial}
        w = self._w
        common = {"continuous_update": False, "style": {"description_width": "150px"}}
        self.sliders = {
            "threshold_foreground": w.FloatSlider(
                value=v["threshold_foreground"], min=0.05, max=0.95, step=0.01,
                description="foreground threshold", **common,
            ),
            "min_center_distance": w.FloatSlider(
                value=v["min_center_distance"], min=0.0, max=4.0, step=0.1,
                description="min seed distance (vx)", **common,
            ),
            "max_center_distance": w.FloatSlider(
                value=v["max_center_distance"], min=0.5, max=8.0, step=0.1,
                description="max seed distance (vx)", **common,
            ),
            "boundary_bias": w.FloatSlider(
                value=v["boundary_bias"], min=0.05, max=0.95, step=0.01,
                description="boundary bias β", **common,
            ),
            "neck_distance": w.FloatSlider(
                value=v["neck_distance"], min=0.0, max=5.0, step=0.25,
                description="neck distance (vx, 0 off)", **common,
            ),
            "min_size": w.IntSlider(
                value=v["min_size"], min=1, max=500, description="min size (voxels)", **common
            ),
            "multicut": w.Checkbox(value=bool(v["multicut"]), description="multicut"),
            "average_edt": w.Checkbox(
                value=bool(v["average_edt"]), description="average with foreground EDT"
            ),
        }  # fmt: skip
        self.labels = np.zeros(self._background.shape, np.uint32)
        self._finish(self._background.shape[0])

    @property
    def n_particles(self) -> int:
        """Instances found in the crop with the current parameters."""
        return int(len(np.unique(self.labels)) - (1 if (self.labels == 0).any() else 0))

    def _on_param(self, change: Any) -> None:
        lo, hi = self.sliders["min_center_distance"], self.sliders["max_center_distance"]
        if lo.value > hi.value:  # keep min <= max: move the other one
            if change["owner"] is lo:
                hi.value = lo.value
                return  # hi's own observer recomputes
            lo.value = hi.value
            return
        self._recompute()

    def _recompute(self) -> None:
        lab = _instances(self._maps, roi=self._roi, block_shape=None, progress=False, **self.params)
        self.labels = np.asarray(lab.values)
        self._draw()

    def _draw(self) -> None:
        z = int(self.z.value)
        fig = Figure(figsize=(8.0, 4.0))
        ax0, ax1 = fig.subplots(1, 2)
        img = self._background[z]
        for ax in (ax0, ax1):
            ax.imshow(img, cmap="gray", interpolation="nearest")
            ax.axis("off")
        lab = self.labels[z]
        shown = np.ma.masked_where(lab == 0, (lab.astype(np.int64) - 1) % len(INSTANCE_COLORS))
        ax1.imshow(shown, cmap=_label_cmap(), vmin=0, vmax=len(INSTANCE_COLORS) - 1, alpha=0.55)
        n = self.n_particles
        ax0.set_title(f"input, z = {z}", fontsize=9)
        ax1.set_title(f"{n} particles in the crop", fontsize=9)
        fig.tight_layout()
        crop = " × ".join(str(s.stop - s.start) for s in self.crop.values())
        self.status.value = f"<b>{n}</b> particles in the {crop} voxel crop"
        self._show(fig, f"{n} particles")

    def apply(self) -> dict[str, Any]:
        """Run ``tl.instances`` with the current parameters on the whole maps.

        Returns
        -------
        dict
            The parameters (keyword arguments of ``tl.instances``); the uint32 labels
            (z, y, x) of the whole tomogram are in ``self.result``.
        """
        params = self.params
        self.result = _instances(self.maps, roi=self.roi, progress=self.progress, **params)
        n = int(self.result.max())
        self.status.value = f"applied to the whole tomogram: <b>{n}</b> particles"
        return params


class LamellaTuner(_Tuner):
    """Tune ``tl.lamella_mask`` on a crop of the probabilities; see :func:`tune_lamella`."""

    def __init__(
        self,
        probabilities: xr.Dataset | xr.DataArray,
        *,
        tomogram: Any = None,
        instances: Any = None,
        crop: Crop = None,
        cls: int | str = -1,
        progress: bool = True,
        threshold: float = 0.9,
        sigma: Sequence[float] = (10.0, 5.0, 5.0),
    ) -> None:
        super().__init__("lamella mask (tl.lamella_mask) on a crop")
        probs = probabilities
        if isinstance(probs, xr.Dataset):
            probs = outputs_of(probs, "lamella")  # a multi-task prediction: its lamella head
            if "probabilities" not in probs:
                raise InputError("probabilities: the Dataset has no 'probabilities' variable")
            probs = probs["probabilities"]
        if not isinstance(probs, xr.DataArray):
            raise InputError(f"probabilities: expected a DataArray, got {type(probs).__name__}")
        self.probabilities, self.cls, self.progress = probs, cls, progress
        shape = [probs.sizes[d] for d in DIMS]
        self.crop = _crop(shape, crop, (shape[0], 128, 128))  # the lamella is a slab: all z
        self._probs = probs.isel(self.crop).compute()
        bg = tomogram
        if bg is None:
            bg = probs.isel({"class": cls}) if "class" in probs.dims else probs
        self._background = _cut(bg.astype(np.float32), self.crop, "tomogram")
        self._labels = None if instances is None else _cut(instances, self.crop, "instances")
        sig = tuple(float(s) for s in sigma)
        w = self._w
        common = {"continuous_update": False, "style": {"description_width": "150px"}}
        self.sliders = {
            "threshold": w.FloatSlider(
                value=float(threshold), min=0.05, max=0.99, step=0.01,
                description="threshold", **common,
            ),
            "sigma_z": w.FloatSlider(
                value=sig[0], min=0.0, max=20.0, step=0.5, description="smoothing σ z (vx)",
                **common,
            ),
            "sigma_yx": w.FloatSlider(
                value=sig[1], min=0.0, max=20.0, step=0.5, description="smoothing σ yx (vx)",
                **common,
            ),
        }  # fmt: skip
        self.mask = np.zeros(self._background.shape, np.uint8)
        self._finish(self._background.shape[0])

    @property
    def params(self) -> dict[str, Any]:
        """The current keyword arguments of ``tl.lamella_mask`` (``threshold``, ``sigma``)."""
        s = self.sliders
        sigma = (s["sigma_z"].value, s["sigma_yx"].value, s["sigma_yx"].value)
        return {"threshold": s["threshold"].value, "sigma": sigma}

    @property
    def fraction(self) -> float:
        """Fraction of the crop's voxels inside the mask."""
        return float(self.mask.mean())

    @property
    def n_particles(self) -> int | None:
        """Instances of ``instances`` overlapping the mask (``None`` without instances)."""
        if self._labels is None:
            return None
        ids = np.unique(self._labels[self.mask > 0])
        return int(np.count_nonzero(ids))

    def _recompute(self) -> None:
        mask = lamella_mask(self._probs, cls=self.cls, progress=False, **self.params)
        self.mask = np.asarray(mask.values)
        self._draw()

    def _draw(self) -> None:
        z = int(self.z.value)
        y = self._background.shape[1] // 2
        fig = Figure(figsize=(8.0, 4.0))
        ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1]})
        views = [(ax0, self._background[z], self.mask[z], f"xy, z = {z}")]
        views.append((ax1, self._background[:, y], self.mask[:, y], f"xz, y = {y}"))
        for ax, img, m, title in views:
            ax.imshow(img, cmap="gray", interpolation="nearest", aspect="auto")
            ax.imshow(np.ma.masked_where(m == 0, m), cmap="autumn", alpha=0.35, aspect="auto")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        text = f"mask: {100 * self.fraction:.1f} % of the crop"
        if self.n_particles is not None:
            text += f", {self.n_particles} particles inside"
        self.status.value = text
        self._show(fig, text)

    def apply(self) -> dict[str, Any]:
        """Run ``tl.lamella_mask`` with the current parameters on the whole tomogram.

        Returns
        -------
        dict
            ``{"threshold": float, "sigma": (z, y, x) voxels}``; the lazy uint8 mask of the
            whole tomogram is in ``self.result``.
        """
        params = self.params
        self.result = lamella_mask(
            self.probabilities, cls=self.cls, progress=self.progress, **params
        )
        self.status.value = f"applied: threshold {params['threshold']:.2f}, σ {params['sigma']}"
        return params


def tune_instances(
    maps: xr.Dataset,
    *,
    tomogram: Any = None,
    roi: Any = None,
    crop: Crop = None,
    progress: bool = True,
    **initial: Any,
) -> InstanceTuner:
    """Sliders for ``tl.instances`` on a crop of the maps, with the live particle count.

    Parameters
    ----------
    maps
        Instance maps (``tl.predict`` with an instance or multi-task model — a multi-task
        prediction gives its instance head —, or ``tl.maps_from_density``): ``foreground``,
        ``boundary``, ``distance`` (z, y, x); only the crop is computed.
    tomogram
        Volume (z, y, x) shown under the labels (default: the foreground map).
    roi
        Region of interest (e.g. the lamella mask), as in ``tl.instances``.
    crop
        Three slices (z, y, x), a dict of them, an edge in voxels, or ``None``: the central
        64 × 128 × 128 voxels (or less).
    progress
        Progress bar of :meth:`InstanceTuner.apply`.
    **initial
        Start values: ``threshold_foreground``, ``min_center_distance``,
        ``max_center_distance`` (voxels), ``boundary_bias``, ``neck_distance`` (voxels),
        ``min_size`` (voxels), ``multicut``, ``average_edt`` (e.g.
        ``**model.metadata["instance_defaults"]``).

    Returns
    -------
    InstanceTuner
        Displays itself; ``.params``, ``.n_particles``, ``.labels`` (crop), ``.apply()``.
    """
    return InstanceTuner(maps, tomogram=tomogram, roi=roi, crop=crop, progress=progress, **initial)


def tune_lamella(
    probabilities: xr.Dataset | xr.DataArray,
    *,
    tomogram: Any = None,
    instances: Any = None,
    crop: Crop = None,
    cls: int | str = -1,
    progress: bool = True,
    threshold: float = 0.9,
    sigma: Sequence[float] = (10.0, 5.0, 5.0),
) -> LamellaTuner:
    """Sliders for ``tl.lamella_mask`` on a crop, with xy / xz previews of the mask.

    Parameters
    ----------
    probabilities
        A lamella or multi-task ``tl.predict`` Dataset (its lamella head) or the lamella
        ``probabilities`` (class, z, y, x); only the crop is computed.
    tomogram
        Volume (z, y, x) shown under the mask (default: the sample probability).
    instances
        Optional instance labels (z, y, x): the preview counts those inside the mask.
    crop
        As in :func:`tune_instances`; default: every z, the central 128 × 128 in y, x
        (the lamella is a slab, its smoothing needs the whole thickness).
    cls
        Class index or name of the sample.
    progress
        Progress bar of :meth:`LamellaTuner.apply`.
    threshold, sigma
        Start values (``sigma`` in voxels, z, y, x; y and x share one slider).

    Returns
    -------
    LamellaTuner
        Displays itself; ``.params``, ``.fraction``, ``.mask`` (crop), ``.apply()``.
    """
    return LamellaTuner(
        probabilities,
        tomogram=tomogram,
        instances=instances,
        crop=crop,
        cls=cls,
        progress=progress,
        threshold=threshold,
        sigma=sigma,
    )
