"""Serve the explorer: one working copy per browser session, a URL token, confined writes.

:func:`serve` is the Python entry point (the ``cryosiam-nb explore`` command calls it);
:func:`main` is ``python -m cryosiam_nb.pl.curation``.

Security: the server binds 127.0.0.1 by default and every HTTP and websocket request must
carry the session token, as ``?token=...`` in the URL printed at start (the page then keeps
it in an HTTP-only cookie) — other users of a shared login node get ``403``. Bokeh session
ids are signed with a random per-server secret. The browser only ever chooses file *names*;
everything is written inside ``output_dir``.
"""

from __future__ import annotations

import argparse
import hmac
import os
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import panel as pn
from bokeh.server.auth_provider import AuthProvider
from tornado.web import RequestHandler

from cryosiam_nb.io import InputError
from cryosiam_nb.particles import Particles
from cryosiam_nb.pl.curation.app import Explorer

__all__ = ["main", "serve", "live_sessions", "TOKEN_COOKIE"]

_LIVE: weakref.WeakValueDictionary[str, Explorer] = weakref.WeakValueDictionary()


def live_sessions() -> list[Explorer]:
    """The explorers of the open browser sessions of this process (oldest first)."""
    return list(_LIVE.values())


#: Cookie that keeps the session token after the first (tokenised) page load.
TOKEN_COOKIE = "cryosiam_nb_token"


class _Denied(RequestHandler):
    def get(self) -> None:
        self.set_status(403)
        self.write(
            "<h1>403: token required</h1><p>Open the URL with <code>?token=...</code> that "
            "the explorer printed when it started.</p>"
        )


class TokenAuth(AuthProvider):
    """Bokeh auth provider: a request is let in only with the right token (query or cookie)."""

    def __init__(self, token: str):
        self._token = str(token)
        super().__init__()

    def _ok(self, value: str | bytes | None) -> bool:
        if not value:
            return False
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return hmac.compare_digest(value.encode(), self._token.encode())

    @property
    def get_user(self):  # noqa: D102 - bokeh's hook
        def get_user(handler: RequestHandler) -> str | None:
            if self._ok(handler.get_cookie(TOKEN_COOKIE)):
                return "curator"
            if self._ok(handler.get_query_argument("token", None)):
                if handler.request.method == "GET" and not handler.request.headers.get("Upgrade"):
                    handler.set_cookie(TOKEN_COOKIE, self._token, httponly=True, samesite="Strict")
                return "curator"
            return None

        return get_user

    @property
    def login_url(self) -> str:  # noqa: D102 - bokeh's hook
        return "/denied"

    @property
    def login_handler(self) -> type[RequestHandler]:  # noqa: D102 - bokeh's hook
        return _Denied


_WARM = False


def warm_up(particles: Particles, tomograms: Mapping[str, Any] | None = None) -> float:
    """Compile datashader's numba kernels (UMAP, selection, slice-viewer images) once.

    Lays out and renders a throw-away explorer over at most 2,000 of the particles, so the
    first browser session does not pay the JIT (tens of seconds on a busy machine). The
    server runs this in a background thread at start (once per process); returns the
    seconds it took (0 when already done).
    """
    from bokeh.document import Document  # noqa: PLC0415

    global _WARM
    if _WARM:
        return 0.0
    _WARM = True
    t0 = time.perf_counter()
    small = particles.subset(np.arange(min(2000, len(particles))))
    ex = Explorer(small, tomograms=tomograms or None, working_copy=False)
    ex.panel().get_root(Document())
    ex.max_scatter = 0
    ex.select_box(-1e9, -1e9, 1e9, 1e9)
    ex._selection_frame()
    return time.perf_counter() - t0


def _parse_tomograms(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if not items:
        return {}
    if isinstance(items, Mapping):
        return {str(k): v for k, v in items.items()}
    out: dict[str, Any] = {}
    for item in items:
        item = str(item)
        name, p = item.split("=", 1) if "=" in item else (Path(item).stem, item)
        if not name or not p:
            raise InputError(f"--tomogram {item!r}: expected NAME=PATH or PATH")
        out[name] = p
    return out


def serve(
    particles: Particles | str | os.PathLike[str],
    tomograms: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    tomogram: str | None = None,
    color_by: str = "cluster",
    port: int = 5006,
    address: str = "127.0.0.1",
    output_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    autosave: bool = True,
    show: bool = False,
    threaded: bool = False,
    **explorer_kwargs: Any,
) -> tuple[Any, str]:
    """Serve the explorer; every browser session curates its own copy of ``particles``.

    Parameters
    ----------
    particles
        A Particles object or the path of a saved store (loaded once, lazily).
    tomograms
        ``{name: path or array}`` or a list of ``NAME=PATH`` / ``PATH`` strings (name = file
        stem) matching ``obs['tomogram']``: slice viewer and tomogram picker.
    tomogram
        The tomogram shown first (default: the first one).
    color_by
        Initial colouring (any ``obs`` column).
    port, address
        Where to listen (default 127.0.0.1:5006; ``port=0`` picks a free port).
    output_dir
        The only folder the app writes to (exports, saves, ``.autosave/``); default the
        store's folder, else the working directory.
    token
        The URL token (default: a random one); requests without it get 403.
    autosave
        Autosave every session's edits to ``output_dir/.autosave`` and offer a restore.
    show
        Open a browser tab.
    threaded
        Run the server in a background thread and return at once (tests, notebooks); else
        block until interrupted.
    **explorer_kwargs
        Passed to :class:`~cryosiam_nb.pl.curation.Explorer` (``page_size``, ``box``, ...).

    Returns
    -------
    tuple
        ``(server, url)``: the Bokeh server (``.stop()`` ends it) and the URL with the token.
    """
    if isinstance(particles, str | os.PathLike):
        store = Path(particles)
        base = Particles.load(store)
        default_out = store.resolve().parent
    else:
        base, default_out = particles, Path.cwd()
    out_dir = Path(output_dir or default_out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tomos = _parse_tomograms(tomograms)
    token = token or secrets.token_urlsafe(24)
    Explorer(base, tomograms=tomos or None, color_by=color_by, tomogram=tomogram)  # fail early
    threading.Thread(target=warm_up, args=(base, tomos), daemon=True).start()

    def app() -> pn.viewable.Viewable:
        ex = Explorer(
            base,
            tomograms=tomos or None,
            color_by=color_by,
            tomogram=tomogram,
            working_copy=True,
            output_dir=out_dir,
            autosave=autosave,
            **explorer_kwargs,
        )
        _LIVE[ex._session_label] = ex
        return ex.panel()

    pn.extension()
    opts: dict[str, Any] = {
        "address": address,
        "show": False,
        "title": "cryosiam_nb explorer",
        "auth_provider": TokenAuth(token),
        "sign_sessions": True,
        "secret_key": secrets.token_urlsafe(32),
    }
    if not port:
        import socket  # noqa: PLC0415

        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
    opts["websocket_origin"] = [f"{address}:{port}", f"localhost:{port}"]
    url = f"http://{address}:{port}/?token={token}"
    print(f"cryosiam_nb explorer: {url}\n  writes only to {out_dir}", file=sys.stderr, flush=True)
    if show:
        import webbrowser  # noqa: PLC0415

        webbrowser.open(url)
    if threaded:
        return pn.serve(app, port=port, threaded=True, **opts), url
    return pn.serve(app, port=port, **opts), url


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the explorer: ``python -m cryosiam_nb.pl.curation particles.zarr [--tomogram N=P]``.

    Parameters
    ----------
    argv
        Command-line arguments (default: ``sys.argv[1:]``): the Particles store, repeatable
        ``--tomogram NAME=PATH`` (or ``PATH``), ``--port``, ``--address``, ``--show``,
        ``--color-by``, ``--output-dir``, ``--token``, ``--no-autosave``. Each browser session
        gets its own working copy; the URL printed carries the access token.
    """
    ap = argparse.ArgumentParser(
        prog="python -m cryosiam_nb.pl.curation",
        description="Serve the cryosiam_nb particle-curation app.",
    )
    ap.add_argument("particles", help="Particles store (.zarr) written by Particles.save")
    ap.add_argument(
        "--tomogram",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="tomogram for the slice viewer / thumbnails (repeatable; PATH alone: name = stem)",
    )
    ap.add_argument("--port", type=int, default=5006)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--show", action="store_true", help="open a browser tab")
    ap.add_argument("--color-by", default="cluster")
    ap.add_argument("--output-dir", default=None, help="folder exports/saves go to")
    ap.add_argument("--token", default=None, help="URL token (default: random)")
    ap.add_argument("--no-autosave", action="store_true")
    args = ap.parse_args(argv)
    serve(
        args.particles,
        args.tomogram,
        color_by=args.color_by,
        port=args.port,
        address=args.address,
        output_dir=args.output_dir,
        token=args.token,
        autosave=not args.no_autosave,
        show=args.show,
    )
