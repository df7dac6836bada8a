"""The paged thumbnail grid of the explorer: a Panel ``JSComponent`` (ESM render + CSS)."""

from __future__ import annotations

import panel as pn
import param

__all__ = ["Gallery"]


class Gallery(pn.custom.JSComponent):
    """Paged thumbnail grid; each tile is ``div.cs-thumb[data-particle-id=<id>]``.

    Clicking a tile sets :attr:`clicked` to the particle id (a Python-side event).
    """

    items = param.List(default=[], doc="dicts with id, xy, xz (PNG data URIs), label")
    clicked = param.String(default="", doc="id of the last clicked thumbnail")
    active = param.String(default="", doc="id drawn as current")

    _esm = """
    export function render({ model, el }) {
      const grid = document.createElement("div");
      grid.className = "cs-gallery-grid";
      el.appendChild(grid);
      function draw() {
        grid.innerHTML = "";
        if (!model.items.length) {
          const e = document.createElement("div");
          e.className = "cs-gallery-empty";
          e.textContent = "Select particles in the UMAP (box or lasso tool) to see them here.";
          grid.appendChild(e);
          return;
        }
        for (const it of model.items) {
          const t = document.createElement("div");
          t.className = "cs-thumb" + (it.id === model.active ? " cs-active" : "")
            + (it.excluded ? " cs-excluded" : "");
          t.dataset.particleId = it.id;
          t.title = it.id + " (" + it.label + ")";
          const imgs = document.createElement("div");
          imgs.className = "cs-thumb-imgs";
          for (const key of ["xy", "xz"]) {
            const im = document.createElement("img");
            im.src = it[key];
            im.alt = key;
            im.className = "cs-thumb-" + key;
            imgs.appendChild(im);
          }
          t.appendChild(imgs);
          const cap = document.createElement("span");
          cap.className = "cs-thumb-id";
          cap.textContent = it.id;
          t.appendChild(cap);
          const lab = document.createElement("span");
          lab.className = "cs-thumb-label";
          lab.textContent = it.label;
          t.appendChild(lab);
          t.addEventListener("click", () => model.send_msg({ id: it.id }));
          grid.appendChild(t);
        }
      }
      model.on("items", draw);
      model.on("active", draw);
      draw();
    }
    """

    _stylesheets = [
        """
        .cs-gallery-grid { display: flex; flex-wrap: wrap; gap: 6px; }
        .cs-gallery-empty { color: #777; font-style: italic; padding: 8px; }
        .cs-thumb { border: 2px solid #ddd; border-radius: 6px; padding: 3px; cursor: pointer;
                    background: #fafafa; display: flex; flex-direction: column;
                    align-items: center; font: 11px sans-serif; }
        .cs-thumb:hover { border-color: #4c8bf5; }
        .cs-thumb.cs-active { border-color: #ff9900; background: #fff4e0; }
        .cs-thumb.cs-excluded { opacity: 0.45; }
        .cs-thumb-imgs { display: flex; gap: 2px; }
        .cs-thumb-imgs img { image-rendering: pixelated; display: block; }
        .cs-thumb-id { font-family: monospace; margin-top: 2px; }
        .cs-thumb-label { color: #666; }
        """
    ]

    def _handle_msg(self, msg: dict[str, str] | object) -> None:
        pid = str(msg.get("id", "")) if isinstance(msg, dict) else ""
        if pid:
            self.active = pid
            # Re-fire even when the same tile is clicked twice.
            self.param.update(clicked="")
            self.clicked = pid
