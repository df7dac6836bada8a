"""Run a tutorial notebook in FAST mode (shared by ``tests/test_notebooks.py`` and
``scripts/screenshots.py``; needs the dev extras ``nbclient``/``nbformat``/``ipykernel``).

Papermill-style parameter injection: the first code cell tagged ``parameters`` must define
``FAST = False``; it becomes ``FAST = True`` and ``OUT`` is pointed at ``out_dir``. The kernel is
the ``python3`` kernel of the running interpreter, started in the notebook's folder.
"""

from __future__ import annotations

from pathlib import Path


def fast_client(path: str | Path, out_dir: str | Path, timeout: int = 600):
    """Read the notebook at ``path``, switch it to FAST mode writing into ``out_dir`` and return
    an ``nbclient.NotebookClient`` for it (``client.nb`` is the notebook; nothing is executed
    yet: call ``client.execute()``, optionally with ``env=`` for the kernel's environment)."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if not params:
        raise ValueError(f"{path.name}: no cell tagged 'parameters'")
    src = params[0].source
    if "FAST = False" not in src:
        raise ValueError(f"{path.name}: parameters cell must define FAST = False")
    params[0].source = src.replace("FAST = False", "FAST = True") + f'\nOUT = r"{out_dir}"\n'
    return NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
