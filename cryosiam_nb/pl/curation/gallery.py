"""The explorer's browser-side components (Panel ``JSComponent``: ESM render + CSS).

:class:`Gallery` (the paged thumbnail grid), :class:`Legend` (clickable colour legend) and
:class:`Keys` (keyboard shortcuts and the Shift state of box / lasso drags).
"""

from __future__ import annotations

import panel as pn
import param

__all__ = ["Gallery", "Legend", "Keys"]


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


class Legend(pn.custom.JSComponent):
    """Colour legend; each row is ``div.cs-legend-item[data-category=<name>]``.

    A click on a row sends ``{"select": name, "add": shift}``, a click on its eye toggles
    ``{"hide": name}``; :attr:`event` receives them (a Python-side dict).
    """

    title = param.String(default="")
    items = param.List(default=[], doc="dicts name, color, count, note, hidden")
    note = param.String(default="", doc="text below the title (numeric fields: the range)")
    event = param.Dict(
        default={}, doc="last click: {'select': name, 'add': bool} or {'hide': name}"
    )

    _esm = """
    export function render({ model, el }) {
      const box = document.createElement("div");
      box.className = "cs-legend";
      el.appendChild(box);
      function draw() {
        box.innerHTML = "";
        const t = document.createElement("b");
        t.textContent = model.title;
        box.appendChild(t);
        if (model.note) {
          const n = document.createElement("div");
          n.className = "cs-legend-note";
          n.textContent = model.note;
          box.appendChild(n);
        }
        for (const it of model.items) {
          const row = document.createElement("div");
          row.className = "cs-legend-item" + (it.hidden ? " cs-hidden" : "");
          row.dataset.category = it.name;
          const eye = document.createElement("span");
          eye.className = "cs-legend-eye";
          eye.textContent = it.hidden ? "○" : "●";
          eye.style.color = it.color;
          eye.title = "show / hide";
          eye.addEventListener("click", (e) => {
            e.stopPropagation();
            model.send_msg({ hide: it.name });
          });
          row.appendChild(eye);
          const name = document.createElement("span");
          name.className = "cs-legend-name";
          name.textContent = " " + it.name + " ";
          row.appendChild(name);
          const c = document.createElement("span");
          c.className = "cs-legend-count";
          c.dataset.n = String(it.count);
          c.textContent = "(" + it.count + ")";
          row.appendChild(c);
          if (it.note) {
            const i = document.createElement("i");
            i.textContent = " " + it.note;
            row.appendChild(i);
          }
          row.title = "click: select this cluster (Shift: add to the selection)";
          row.addEventListener("click", (e) => model.send_msg({ select: it.name, add: e.shiftKey }));
          box.appendChild(row);
        }
      }
      model.on("items", draw);
      model.on("title", draw);
      model.on("note", draw);
      draw();
    }
    """

    _stylesheets = [
        """
        .cs-legend { font: 12px sans-serif; }
        .cs-legend-note { color: #666; }
        .cs-legend-item { cursor: pointer; padding: 1px 2px; border-radius: 3px; }
        .cs-legend-item:hover { background: #eef3ff; }
        .cs-legend-item.cs-hidden { color: #aaa; }
        .cs-legend-eye { font-size: 14px; }
        .cs-legend-count { color: #888; }
        """
    ]

    def _handle_msg(self, msg: dict[str, object] | object) -> None:
        if isinstance(msg, dict) and ("select" in msg or "hide" in msg):
            self.param.update(event={})
            self.event = {k: msg[k] for k in ("select", "add", "hide") if k in msg}


class Keys(pn.custom.JSComponent):
    """Keyboard shortcuts (outside text fields) and the Shift state of pointer drags.

    Sends ``{"shift": bool}`` on every pointer press (before a box / lasso drag reaches the
    server, so Shift-drag adds to the selection) and ``{"key": k}`` for the shortcut keys
    ``e`` (exclude), ``i`` (include), ``u`` / Ctrl+Z (undo), ``n`` / → (next page),
    ``p`` / ← (previous page), ``Escape`` (clear the selection).
    """

    shift = param.Boolean(default=False)
    key = param.String(default="", doc="last shortcut key pressed")

    _esm = """
    export function render({ model, el }) {
      el.style.display = "none";
      const keys = new Set(["e", "i", "u", "n", "p", "ArrowRight", "ArrowLeft", "Escape"]);
      const onPointer = (e) => model.send_msg({ shift: e.shiftKey });
      const onKey = (e) => {
        const t = e.composedPath()[0];
        const tag = (t && t.tagName) || "";
        if (["INPUT", "TEXTAREA", "SELECT"].includes(tag) || (t && t.isContentEditable)) return;
        let k = e.key;
        if ((e.ctrlKey || e.metaKey) && k.toLowerCase() === "z") k = "u";
        else if (e.ctrlKey || e.metaKey || e.altKey) return;
        if (keys.has(k)) { model.send_msg({ key: k }); }
      };
      document.addEventListener("pointerdown", onPointer, true);
      document.addEventListener("keydown", onKey, true);
      model.on("remove", () => {
        document.removeEventListener("pointerdown", onPointer, true);
        document.removeEventListener("keydown", onKey, true);
      });
    }
    """

    def _handle_msg(self, msg: dict[str, object] | object) -> None:
        if not isinstance(msg, dict):
            return
        if "shift" in msg:
            self.shift = bool(msg["shift"])
        if msg.get("key"):
            self.param.update(key="")
            self.key = str(msg["key"])
