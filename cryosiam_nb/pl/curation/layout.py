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
from cryosiam_nb.pl.curation.gallery import Gallery, Keys, Legend

__all__: list[str] = []


def _html(s: object) -> str:
    return html.escape(str(s), quote=True)


class LayoutMixin:
    """Widgets and layout of :class:`~cryosiam_nb.pl.curation.Explorer` (needs its state)."""

    def legend_items(self) -> list[dict[str, Any]]:
        """Legend rows of a categorical colour-by field: name, color, count, note, hidden."""
        f = self.color_by
        if f not in self._color_keys:
            return []
        counts = self.category_counts(f)
        ann = self.particles.uns.get("cluster_annotations", {}) if f == "cluster" else {}
        hidden = self._hidden.get(f, set())
        return [
            {
                "name": cat,
                "color": col,
                "count": int(counts.get(cat, 0)),
                "note": str(ann.get(cat, "")),
                "hidden": cat in hidden,
            }
            for cat, col in self._color_keys[f].items()
        ]

    def legend_note(self) -> str:
        """Legend subtitle: the value range of a numeric colour-by field (else empty)."""
        f = self.color_by
        if f in self._color_keys:
            return ""
        s = self._frame[f]
        return f"viridis, mean per pixel: {np.nanmin(s):.3g} … {np.nanmax(s):.3g}"

    def legend_html(self) -> str:
        """The legend as static HTML (for notebooks / reports)."""
        rows = "".join(
            f"<div class='cs-legend-item' data-category='{_html(it['name'])}'>"
            f"<span style='color:{it['color']}'>●</span> {_html(it['name'])} "
            f"<span style='color:#888'>({it['count']})</span>"
            + (f" <i>{_html(it['note'])}</i>" if it["note"] else "")
            + "</div>"
            for it in self.legend_items()
        )
        return (
            f"<div class='cs-legend'><b>{_html(self.color_by)}</b> {self.legend_note()}{rows}</div>"
        )

    def header_html(self) -> str:
        """Header line: particle, cluster, excluded and session-edit counts."""
        obs = self.particles.obs
        n_exc = int(obs["excluded"].sum()) if "excluded" in obs.columns else 0
        n_cl = len(self.clusters())
        return (
            f"<div class='cs-header' data-clusters='{n_cl}' data-excluded='{n_exc}'>"
            f"<b>cryosiam_nb explorer</b> — {len(obs):,} particles, "
            f"<span class='cs-n-clusters'>{n_cl} clusters</span>, "
            f"<span class='cs-n-excluded'>{n_exc:,} excluded</span>, "
            f"<span class='cs-n-edits'>{self.n_session_edits} edit(s) this session</span>"
            f" · output folder <code>{_html(self.output_dir)}</code></div>"
        )

    def _build_widgets(self) -> dict[str, Any]:
        w: dict[str, Any] = {}
        w["color_by"] = pn.widgets.Select.from_param(self.param.color_by, label="colour by")
        w["order"] = pn.widgets.Select.from_param(self.param.order, label="gallery order")
        w["clusters"] = pn.widgets.MultiSelect(
            label="clusters", options=self.clusters(), size=6, css_classes=["cs-clusters"]
        )
        w["name"] = pn.widgets.TextInput(label="new name / merge into", placeholder="e.g. ribosome")
        w["note"] = pn.widgets.TextInput(label="annotation", placeholder="e.g. 80S ribosome?")
        w["find"] = pn.widgets.TextInput(
            label="find particle id", placeholder="e.g. p0042", css_classes=["cs-find"]
        )
        for key, label, extra in [
            ("rename", "Rename", {}),
            ("annotate", "Annotate", {}),
            ("merge", "Merge clusters", {"color": "primary"}),
            ("split", "Split selection", {}),
            ("exclude", "Exclude selection (e)", {"color": "warning"}),
            ("include", "Include selection (i)", {}),
            ("select_clusters", "Select clusters", {}),
            ("undo", "Undo (u)", {"color": "danger"}),
            ("export", "Export", {"color": "success"}),
            ("save", "Save particles", {"color": "success"}),
            ("average", "Average selection", {}),
            ("average_clusters", "Average clusters", {}),
            ("restore", "Restore", {"color": "primary"}),
            ("discard", "Discard", {}),
            ("recluster", "Re-embed selection", {"color": "primary"}),
            ("full_umap", "Full UMAP", {}),
            ("hist_selection", "Histograms of selection", {}),
            ("hist_cluster", "Histograms of cluster", {}),
        ]:
            css = "cs-" + key.replace("_", "-")
            w[key] = pn.widgets.Button(label=label, css_classes=[css], **extra)
        w["k"] = pn.widgets.IntInput(label="split into k (0 = auto)", value=0, start=0, end=50)
        w["recluster_k"] = pn.widgets.IntInput(
            label="k-means k of the subset (0 = auto, 1 = UMAP only)",
            value=0,
            start=0,
            end=50,
            css_classes=["cs-recluster-k"],
        )
        w["hist_view"] = pn.Column(css_classes=["cs-hist"])
        w["export_tomo"] = pn.widgets.Checkbox(
            label="only the tomogram in the viewer",
            value=False,
            disabled=not self.tomograms,
            css_classes=["cs-export-tomo"],
        )
        w["scope"] = pn.widgets.RadioButtonGroup(
            label="export", options=["selection", "clusters", "all"], value="selection"
        )
        w["format"] = pn.widgets.Select(
            label="format", options=list(EXPORT_FORMATS), css_classes=["cs-format"]
        )
        w["path"] = pn.widgets.TextInput(
            label="export file name (in the output folder)",
            value=Path(self.export_path).name,
            css_classes=["cs-export-path"],
        )
        w["overwrite"] = pn.widgets.Checkbox(label="overwrite", value=False)
        w["download"] = pn.widgets.FileDownload(
            callback=self._download, filename="selection.star", label="Download export"
        )
        w["save_path"] = pn.widgets.TextInput(
            label="save curated particles as",
            value="particles_curated.zarr",
            css_classes=["cs-save-path"],
        )
        w["prev"] = pn.widgets.Button(label="◀ prev", width=80, css_classes=["cs-prev"])
        w["next"] = pn.widgets.Button(label="next ▶", width=80, css_classes=["cs-next"])
        w["page_info"] = pn.pane.HTML("", css_classes=["cs-page-info"])
        w["status"] = pn.pane.HTML("", css_classes=["cs-status"], sizing_mode="stretch_width")
        w["header"] = pn.pane.HTML(self.header_html(), sizing_mode="stretch_width")
        w["legend"] = Legend(
            title=self.color_by, items=self.legend_items(), note=self.legend_note(), width=220
        )
        w["gallery"] = Gallery(sizing_mode="stretch_width", css_classes=["cs-gallery"])
        w["keys"] = Keys(width=0, height=0)
        w["average_view"] = pn.pane.HTML("", css_classes=["cs-average"])
        w["prompt_text"] = pn.pane.HTML("", css_classes=["cs-restore-text"])
        w["prompt"] = pn.Row(
            w["prompt_text"], w["restore"], w["discard"], visible=False, css_classes=["cs-prompt"]
        )
        if self.tomograms:
            w["tomogram"] = pn.widgets.Select(
                label="tomogram",
                options=list(self.tomograms),
                value=self._start_tomogram(),
                css_classes=["cs-tomogram"],
            )
        return w

    def _start_tomogram(self) -> str:
        return self.first_tomogram or next(iter(self.tomograms))

    def _guard(self, fn: Callable[[], Any]) -> Callable[[Any], None]:
        """Wrap a button callback: user errors go to the status line instead of raising."""

        def run() -> None:
            try:
                fn()
            except FileExistsError as err:
                self.status = f"⚠ {err} (tick 'overwrite' or choose another name)"
            except (ValueError, KeyError, OSError) as err:
                self.status = f"⚠ {err}"

        return lambda event=None: self._when_loaded(run)

    def _wire(self) -> None:
        w = self._widgets
        g = self._guard
        w["rename"].on_click(g(lambda: self.rename(*self._one_cluster(), w["name"].value)))
        w["annotate"].on_click(g(lambda: self.annotate(self._one_cluster()[0], w["note"].value)))
        w["merge"].on_click(
            g(lambda: self.merge(w["clusters"].value, into=w["name"].value or None))
        )
        w["split"].on_click(g(lambda: self.split_selection(w["k"].value or None)))
        w["exclude"].on_click(g(self.exclude_selection))
        w["include"].on_click(g(self.include_selection))
        w["undo"].on_click(g(self.undo))
        w["recluster"].on_click(g(lambda: self.recluster_selection(w["recluster_k"].value)))
        w["full_umap"].on_click(g(self.show_full_umap))
        w["hist_selection"].on_click(g(lambda: self._show_histograms("selection")))
        w["hist_cluster"].on_click(g(lambda: self._show_histograms("cluster")))
        w["select_clusters"].on_click(g(lambda: self.select_clusters(w["clusters"].value)))
        w["export"].on_click(g(self._export_from_widgets))
        w["save"].on_click(g(lambda: self.save(self.out_path(w["save_path"].value, "save name"))))
        w["average"].on_click(g(lambda: self._show_average(None, "selection")))
        w["average_clusters"].on_click(g(self._average_clusters))
        w["restore"].on_click(g(lambda: self._answer_prompt(True)))
        w["discard"].on_click(g(lambda: self._answer_prompt(False)))
        w["prev"].on_click(lambda e: self._turn(-1))
        w["next"].on_click(lambda e: self._turn(+1))
        w["format"].param.watch(self._on_format, "value")
        w["find"].param.watch(lambda e: g(lambda: self.find(e.new))() if e.new else None, "value")
        w["gallery"].param.watch(self._on_thumb_click, "clicked")
        w["legend"].param.watch(self._on_legend, "event")
        w["keys"].param.watch(lambda e: setattr(self, "_append", bool(e.new)), "shift")
        w["keys"].param.watch(self._on_key, "key")
        if "tomogram" in w:
            w["tomogram"].param.watch(lambda e: self._show_viewer(e.new), "value")
        self.param.watch(self._refresh_gallery, ["selection_version", "page"])
        self.param.watch(self._refresh_clusters, ["data_version", "color_by"], precedence=1)
        self.param.watch(self._refresh_status, ["status"])

    def _one_cluster(self) -> tuple[str]:
        chosen = list(self._widgets["clusters"].value)
        if len(chosen) != 1:
            raise InputError(f"choose exactly one cluster in the list (chosen: {chosen})")
        return (chosen[0],)

    def _turn(self, step: int) -> None:
        self.page = int(np.clip(self.page + step, 0, self.n_pages - 1))

    def _on_key(self, event: Any) -> None:
        actions = {
            "e": self.exclude_selection,
            "i": self.include_selection,
            "u": self.undo,
            "n": lambda: self._turn(+1),
            "ArrowRight": lambda: self._turn(+1),
            "p": lambda: self._turn(-1),
            "ArrowLeft": lambda: self._turn(-1),
            "Escape": self.clear_selection,
        }
        if event.new in actions:
            self._guard(actions[event.new])()

    def _on_legend(self, event: Any) -> None:
        ev = event.new or {}
        f = self.color_by
        if "hide" in ev:
            hidden = self._hidden.setdefault(f, set())
            hidden.symmetric_difference_update({str(ev["hide"])})
            self.data_version += 1
        elif "select" in ev:
            name = str(ev["select"])
            col = self.category_codes(f)
            code = (self._codes_of(f, [name]) or [-2])[0]
            self._guard(
                lambda: self._set_selection(
                    np.flatnonzero(col == code), f"legend {name}", bool(ev.get("add"))
                )
            )()

    def _export_tomogram(self) -> str | None:
        """The tomogram an export is restricted to (the viewer's, when ticked), else None."""
        w = self._widgets
        return w["tomogram"].value if w["export_tomo"].value and "tomogram" in w else None

    def _export_from_widgets(self) -> Path:
        w = self._widgets
        fmt = EXPORT_FORMATS[w["format"].value][0]
        target = self.out_path(w["path"].value, "export file name")
        return self.export(
            target,
            fmt,
            w["scope"].value,
            w["clusters"].value,
            overwrite=w["overwrite"].value,
            tomogram=self._export_tomogram(),
        )

    def _on_format(self, event: Any) -> None:
        """A format switch proposes that format's own file name (never another's)."""
        old_default, new_default = EXPORT_FORMATS[event.old][1], EXPORT_FORMATS[event.new][1]
        cur = self._widgets["path"].value
        if cur == old_default or not cur:
            name = new_default
        else:
            stem = cur.removesuffix(old_default.removeprefix("selection"))
            name = stem + new_default.removeprefix("selection")
        self._widgets["path"].value = name
        self._widgets["download"].filename = new_default + ("" if "." in new_default else ".zip")

    def _download(self) -> io.BytesIO:
        """Bytes of the export for the browser download (copick folders are zipped)."""
        w = self._widgets
        fmt = EXPORT_FORMATS[w["format"].value][0]
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / EXPORT_FORMATS[w["format"].value][1]
            try:
                self.export(
                    target,
                    fmt,
                    w["scope"].value,
                    w["clusters"].value,
                    tomogram=self._export_tomogram(),
                )
            except ValueError as err:
                self.status = f"⚠ {err}"
                return io.BytesIO(b"")
            if target.is_dir():
                archive = shutil.make_archive(str(Path(tmp) / "copick"), "zip", target)
                return io.BytesIO(Path(archive).read_bytes())
            return io.BytesIO(target.read_bytes())

    def _on_thumb_click(self, event: Any) -> None:
        if event.new:
            self._guard(lambda: self.show_particle(event.new))()

    def _show_average(self, ids: Any, what: str) -> None:
        v = self.average_views(ids)
        imgs = "".join(
            f"<figure style='margin:2px'><img src='{v[k]}' alt='{k}' class='cs-avg-{k}' "
            f"style='image-rendering:pixelated'><figcaption>{k}</figcaption></figure>"
            for k in ("xy", "xz", "yz")
        )
        sample = "" if v["n_used"] == v["n_total"] else f" (random sample of {v['n_total']:,})"
        self._widgets["average_view"].object = (
            f"<div class='cs-average-box' data-n='{v['n_used']}'><b>Average of {_html(what)}"
            f"</b>: <span class='cs-avg-count'>{v['n_used']:,} particle(s)</span>{sample}, "
            f"box {v['box']} voxels<div style='display:flex'>{imgs}</div></div>"
        )
        self.status = f"averaged {v['n_used']} particle(s) of {what}"

    def _show_histograms(self, scope: str) -> None:
        self._widgets["hist_view"].objects = [pn.pane.HoloViews(self.histograms(scope))]
        self.status = f"histograms of the {scope}"

    def _average_clusters(self) -> None:
        names = self.particles._require_clusters(self._widgets["clusters"].value)
        if not names:
            raise InputError("choose one or more clusters in the list to average")
        mask = self.particles.obs["cluster"].isin(names).to_numpy(dtype=bool, na_value=False)
        self._show_average(mask, "cluster(s) " + ", ".join(names))

    def _offer_restore(self) -> None:
        cands = self.autosave_candidates() if self._autosave else []
        w = self._widgets
        if not cands:
            w["prompt"].visible = False
            return
        c = cands[0]
        self._prompt_path = c["path"]
        w["prompt_text"].object = (
            f"<div class='cs-restore-msg'>⚠ Unsaved edits of another session were autosaved "
            f"({c['n_edits']} edit(s), started {c['started']}, last {c['updated']} UTC). "
            "Restore them into this session?</div>"
        )
        w["prompt"].visible = True

    def _answer_prompt(self, restore: bool) -> None:
        path = getattr(self, "_prompt_path", None)
        if path is not None:
            if restore:
                self.restore_autosave(path)
            else:
                self.discard_autosave(path)
                self.status = f"discarded autosave {Path(path).name}"
        self._offer_restore()

    def _refresh_gallery(self, *_: Any) -> None:
        w = self._widgets
        if not w:
            return
        n = len(self._sel)
        with pn.io.hold():
            w["gallery"].items = self.gallery_items()
            w["page_info"].object = (
                f"<span class='cs-page'>page {self.page + 1} / {self.n_pages}</span> · "
                f"<span class='cs-n-selected' data-n='{n}'>{n} selected</span>"
            )
        # The viewer's markers (three views) follow on the next tick, after the gallery and
        # the counts have gone out to the browser.
        pn.state.execute(self._update_viewer_highlight, schedule=True)

    def _refresh_clusters(self, *_: Any) -> None:
        w = self._widgets
        if not w:
            return
        names = self.clusters()
        with pn.io.hold():
            w["clusters"].options = names
            w["clusters"].value = [c for c in w["clusters"].value if c in names]
            w["legend"].param.update(
                title=self.color_by, items=self.legend_items(), note=self.legend_note()
            )
            w["header"].object = self.header_html()

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
        subset = pn.Card(
            w["recluster_k"],
            pn.Row(w["recluster"], w["full_umap"]),
            title="Re-embed a subset",
            width=300,
        )
        export = pn.Card(
            w["scope"],
            w["export_tomo"],
            w["format"],
            w["path"],
            w["overwrite"],
            pn.Row(w["export"], w["download"]),
            pn.layout.Divider(),
            w["save_path"],
            w["save"],
            title="Export / save",
            width=300,
        )
        average = pn.Card(
            pn.Row(w["average"], w["average_clusters"]),
            w["average_view"],
            title="Average",
            width=300,
        )
        hists = pn.Card(
            pn.Row(w["hist_selection"], w["hist_cluster"]),
            w["hist_view"],
            title="Size / score histograms",
            width=300,
        )
        sidebar = pn.Column(
            w["color_by"], w["find"], curation, subset, export, average, hists, width=310
        )
        umap = pn.pane.HoloViews(self.umap_plot(), css_classes=["cs-umap"])
        gallery = pn.Column(
            pn.Row(
                pn.pane.HTML("<b>Selected particles</b>"),
                w["order"],
                w["prev"],
                w["next"],
                w["page_info"],
            ),
            w["gallery"],
            sizing_mode="stretch_width",
        )
        views = [pn.Row(umap, w["legend"])]
        if self.tomograms:
            # The slice viewer is part of the first document. Built on load (Panel 1.9.4), its
            # models were sometimes dropped by a hold that ended before the session counted
            # as connected; the next change referring to them ("reference … isn't known")
            # then froze the page. Measured with it in: first frame 3.2-3.9 s at 10k-100k.
            w["viewer_holder"] = pn.Column()
            self._show_viewer(w["tomogram"].value)
            views.append(pn.Column(w["tomogram"], w["viewer_holder"]))
        self._layout = pn.Column(
            w["header"],
            w["prompt"],
            w["status"],
            w["keys"],
            pn.Row(sidebar, pn.Column(pn.Row(*views), gallery, sizing_mode="stretch_width")),
            css_classes=["cs-explorer"],
            sizing_mode="stretch_width",
        )
        self._refresh_gallery()
        self._refresh_status()
        self._offer_restore()
        return self._layout

    def __panel__(self) -> pn.viewable.Viewable:
        return self.panel()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        # Jupyter shows the app inline when the object is the last expression of a cell.
        return self.panel()._repr_mimebundle_(include, exclude)

    def servable(self, title: str = "cryosiam_nb explorer") -> pn.viewable.Viewable:
        """Mark the layout servable (``panel serve my_script.py``)."""
        return self.panel().servable(title=title)
