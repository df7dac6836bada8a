"""The explorer's Panel layout: widgets, their callbacks, the legend and the page layout."""

from __future__ import annotations

import html
import io
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import panel as pn

from cryosiam_nb.io import InputError
from cryosiam_nb.pl.curation.exporting import EXPORT_FORMATS
from cryosiam_nb.pl.curation.gallery import Gallery

__all__: list[str] = []


def _html(s: object) -> str:
    return html.escape(str(s), quote=True)


class LayoutMixin:
    """Widgets and layout of :class:`~cryosiam_nb.pl.curation.Explorer` (needs its state)."""

    def legend_html(self) -> str:
        """HTML legend of the colour-by categories with counts (and cluster annotations)."""
        f = self.color_by
        if f == "score":
            s = self._frame["score"]
            return (
                f"<div class='cs-legend'><b>score</b> (viridis, mean per pixel): "
                f"{np.nanmin(s):.3g} … {np.nanmax(s):.3g}</div>"
            )
        counts = self._frame[f].value_counts(sort=False)
        ann = self.particles.uns.get("cluster_annotations", {}) if f == "cluster" else {}
        rows = []
        for cat, col in self._color_keys.get(f, {}).items():
            note = f" <i>{_html(ann[cat])}</i>" if cat in ann else ""
            rows.append(
                f"<div class='cs-legend-item' data-category='{_html(cat)}'>"
                f"<span style='display:inline-block;width:10px;height:10px;"
                f"background:{col};margin-right:4px;border-radius:2px'></span>"
                f"{_html(cat)} <span style='color:#888'>({int(counts.get(cat, 0))})</span>"
                f"{note}</div>"
            )
        return f"<div class='cs-legend'><b>{f}</b>{''.join(rows)}</div>"

    def _build_widgets(self) -> dict[str, Any]:
        w: dict[str, Any] = {}
        w["color_by"] = pn.widgets.Select.from_param(self.param.color_by, label="colour by")
        w["clusters"] = pn.widgets.MultiSelect(
            label="clusters", options=self.clusters(), size=6, css_classes=["cs-clusters"]
        )
        w["name"] = pn.widgets.TextInput(label="new name / merge into", placeholder="e.g. ribosome")
        w["note"] = pn.widgets.TextInput(label="annotation", placeholder="e.g. 80S ribosome?")
        w["rename"] = pn.widgets.Button(label="Rename", css_classes=["cs-rename"])
        w["annotate"] = pn.widgets.Button(label="Annotate", css_classes=["cs-annotate"])
        w["merge"] = pn.widgets.Button(
            label="Merge clusters", color="primary", css_classes=["cs-merge"]
        )
        w["k"] = pn.widgets.IntInput(label="split into k (0 = auto)", value=0, start=0, end=50)
        w["split"] = pn.widgets.Button(label="Split selection", css_classes=["cs-split"])
        w["exclude"] = pn.widgets.Button(
            label="Exclude selection", color="warning", css_classes=["cs-exclude"]
        )
        w["include"] = pn.widgets.Button(label="Include selection", css_classes=["cs-include"])
        w["select_clusters"] = pn.widgets.Button(
            label="Select clusters", css_classes=["cs-select-clusters"]
        )
        w["undo"] = pn.widgets.Button(label="Undo", color="danger", css_classes=["cs-undo"])
        w["scope"] = pn.widgets.RadioButtonGroup(
            label="export", options=["selection", "clusters", "all"], value="selection"
        )
        w["format"] = pn.widgets.Select(label="format", options=list(EXPORT_FORMATS))
        w["path"] = pn.widgets.TextInput(
            label="export path", value=self.export_path, css_classes=["cs-export-path"]
        )
        w["export"] = pn.widgets.Button(label="Export", color="success", css_classes=["cs-export"])
        w["download"] = pn.widgets.FileDownload(
            callback=self._download, filename="selection.star", label="Download export"
        )
        w["save_path"] = pn.widgets.TextInput(
            label="save curated particles to",
            value=str(Path(self.export_path).with_name("particles_curated.zarr")),
        )
        w["save"] = pn.widgets.Button(label="Save particles", css_classes=["cs-save"])
        w["prev"] = pn.widgets.Button(label="◀ prev", width=80, css_classes=["cs-prev"])
        w["next"] = pn.widgets.Button(label="next ▶", width=80, css_classes=["cs-next"])
        w["page_info"] = pn.pane.HTML("", css_classes=["cs-page-info"])
        w["status"] = pn.pane.HTML("", css_classes=["cs-status"], sizing_mode="stretch_width")
        w["legend"] = pn.pane.HTML(self.legend_html(), width=200, css_classes=["cs-legend-pane"])
        w["gallery"] = Gallery(sizing_mode="stretch_width", css_classes=["cs-gallery"])
        if self.tomograms:
            w["tomogram"] = pn.widgets.Select(label="tomogram", options=list(self.tomograms))
        return w

    def _guard(self, fn: Callable[[], Any]) -> Callable[[Any], None]:
        """Wrap a button callback: user errors go to the status line instead of raising."""

        def cb(event: Any = None) -> None:
            try:
                fn()
            except (ValueError, KeyError, FileExistsError) as err:
                self.status = f"⚠ {err}"

        return cb

    def _wire(self) -> None:
        w = self._widgets
        w["rename"].on_click(
            self._guard(lambda: self.rename(*self._one_cluster(), w["name"].value))
        )
        w["annotate"].on_click(
            self._guard(lambda: self.annotate(self._one_cluster()[0], w["note"].value))
        )
        w["merge"].on_click(
            self._guard(lambda: self.merge(w["clusters"].value, into=w["name"].value or None))
        )
        w["split"].on_click(self._guard(lambda: self.split_selection(w["k"].value or None)))
        w["exclude"].on_click(self._guard(self.exclude_selection))
        w["include"].on_click(self._guard(self.include_selection))
        w["undo"].on_click(self._guard(self.undo))
        w["select_clusters"].on_click(
            self._guard(lambda: self.select_clusters(w["clusters"].value))
        )
        w["export"].on_click(self._guard(self._export_from_widgets))
        w["save"].on_click(self._guard(lambda: self.save(w["save_path"].value)))
        w["prev"].on_click(lambda e: self._turn(-1))
        w["next"].on_click(lambda e: self._turn(+1))
        w["format"].param.watch(self._on_format, "value")
        w["gallery"].param.watch(self._on_thumb_click, "clicked")
        if "tomogram" in w:
            w["tomogram"].param.watch(lambda e: self._show_viewer(e.new), "value")
        self.param.watch(self._refresh_gallery, ["selection_version", "page"])
        self.param.watch(self._refresh_clusters, ["data_version", "color_by"])
        self.param.watch(self._refresh_status, ["status"])

    def _one_cluster(self) -> tuple[str]:
        chosen = list(self._widgets["clusters"].value)
        if len(chosen) != 1:
            raise InputError(f"choose exactly one cluster in the list (chosen: {chosen})")
        return (chosen[0],)

    def _turn(self, step: int) -> None:
        self.page = int(np.clip(self.page + step, 0, self.n_pages - 1))

    def _export_from_widgets(self) -> Path:
        w = self._widgets
        fmt = EXPORT_FORMATS[w["format"].value][0]
        return self.export(w["path"].value, fmt, w["scope"].value, w["clusters"].value)

    def _on_format(self, event: Any) -> None:
        suffix = EXPORT_FORMATS[event.new][1]
        p = Path(self._widgets["path"].value)
        stem = p.with_suffix("") if p.suffix in (".star", ".csv") else p
        self._widgets["path"].value = str(stem) + suffix
        self._widgets["download"].filename = (
            "selection" + (suffix or ".zip") if suffix else "copick.zip"
        )

    def _download(self) -> io.BytesIO:
        """Bytes of the export for the browser download (copick folders are zipped)."""
        w = self._widgets
        fmt = EXPORT_FORMATS[w["format"].value][0]
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / ("export" + (EXPORT_FORMATS[w["format"].value][1] or ""))
            try:
                self.export(target, fmt, w["scope"].value, w["clusters"].value)
            except ValueError as err:
                self.status = f"⚠ {err}"
                return io.BytesIO(b"")
            if target.is_dir():
                archive = shutil.make_archive(str(Path(tmp) / "copick"), "zip", target)
                return io.BytesIO(Path(archive).read_bytes())
            return io.BytesIO(target.read_bytes())

    def _on_thumb_click(self, event: Any) -> None:
        if event.new:
            try:
                self.show_particle(event.new)
            except ValueError as err:
                self.status = f"⚠ {err}"

    def _refresh_gallery(self, *_: Any) -> None:
        w = self._widgets
        if not w:
            return
        w["gallery"].items = self.gallery_items()
        n = len(self._sel)
        w["page_info"].object = (
            f"<span class='cs-page'>page {self.page + 1} / {self.n_pages}</span> · "
            f"<span class='cs-n-selected' data-n='{n}'>{n} selected</span>"
        )
        self._update_viewer_highlight()

    def _refresh_clusters(self, *_: Any) -> None:
        w = self._widgets
        if not w:
            return
        names = self.clusters()
        w["clusters"].options = names
        w["clusters"].value = [c for c in w["clusters"].value if c in names]
        w["legend"].object = self.legend_html()
        obs = self.particles.obs
        for name, v in self._viewers.items():
            v.set_particles(obs.loc[obs["tomogram"].astype(str) == name, ["z", "y", "x"]])

    def _refresh_status(self, *_: Any) -> None:
        if "status" in self._widgets:
            self._widgets[
                "status"
            ].object = f"<div class='cs-status-text'>{_html(self.status)}</div>"

    def _show_viewer(self, name: str) -> None:
        if "viewer_holder" in self._widgets:
            self._widgets["viewer_holder"].objects = [self._viewer(name).panel()]
            self._update_viewer_highlight()

    def panel(self) -> pn.viewable.Viewable:
        """The Panel layout (build once; display inline in Jupyter or serve)."""
        if self._layout is not None:
            return self._layout
        self._widgets = self._build_widgets()
        w = self._widgets
        self._wire()
        curation = pn.Card(
            w["clusters"],
            pn.Row(w["select_clusters"], w["merge"]),
            w["name"],
            w["rename"],
            w["note"],
            w["annotate"],
            pn.layout.Divider(),
            w["k"],
            w["split"],
            pn.Row(w["exclude"], w["include"]),
            w["undo"],
            title="Curate",
            width=300,
        )
        export = pn.Card(
            w["scope"],
            w["format"],
            w["path"],
            pn.Row(w["export"], w["download"]),
            pn.layout.Divider(),
            w["save_path"],
            w["save"],
            title="Export",
            width=300,
        )
        n = len(self.particles)
        header = pn.pane.HTML(
            f"<div class='cs-header'><b>cryosiam_nb explorer</b> — {n:,} particles, "
            f"{len(self.clusters())} clusters</div>",
            sizing_mode="stretch_width",
        )
        sidebar = pn.Column(w["color_by"], curation, export, width=310)
        umap = pn.pane.HoloViews(self.umap_plot(), css_classes=["cs-umap"])
        gallery = pn.Column(
            pn.Row(pn.pane.HTML("<b>Selected particles</b>"), w["prev"], w["next"], w["page_info"]),
            w["gallery"],
            sizing_mode="stretch_width",
        )
        main_col = [pn.Row(umap, w["legend"]), gallery]
        if self.tomograms:
            first = next(iter(self.tomograms))
            w["viewer_holder"] = pn.Column(self._viewer(first).panel())
            main_col.append(pn.Column(w["tomogram"], w["viewer_holder"]))
        self._layout = pn.Column(
            header,
            w["status"],
            pn.Row(sidebar, pn.Column(*main_col, sizing_mode="stretch_width")),
            css_classes=["cs-explorer"],
            sizing_mode="stretch_width",
        )
        self._refresh_gallery()
        self._refresh_status()
        return self._layout

    def __panel__(self) -> pn.viewable.Viewable:
        return self.panel()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        # Jupyter shows the app inline when the object is the last expression of a cell.
        return self.panel()._repr_mimebundle_(include, exclude)

    def servable(self, title: str = "cryosiam_nb explorer") -> pn.viewable.Viewable:
        """Mark the layout servable (``panel serve my_script.py``)."""
        return self.panel().servable(title=title)
