"""The package's shape: imports run one way, modules stay small, one definition per constant."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cryosiam_nb"

#: The import direction of docs/DEVELOPING.md: a module may import only from its own
#: group or from groups listed before it. ``sim`` sits beside ``io`` (it needs io only).
LAYERS: tuple[str, ...] = (
    "constants",
    "io",
    "device",
    "sim",
    "metrics",
    "transforms",
    "pp",
    "models",
    "inference",
    "segmentation",
    "particles",
    "analysis",
    "export",
    "pl",
    "training",
    "tl",
    "demo",
    "workflow",
    "cli",
    "_nbrun",
)

MAX_LINES = 650


def _group(module: str) -> str:
    """'cryosiam_nb.pl.curation.app' → 'pl'; the package itself → ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every cryosiam_nb module imported anywhere in ``path`` (also inside functions)."""
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, me: str, is_pkg: bool) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("cryosiam_nb")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("cryosiam_nb"):
                continue
            if mod == "cryosiam_nb":  # ``from cryosiam_nb import io, pp``
                out += [
                    (node.lineno, f"cryosiam_nb.{a.name}")
                    for a in node.names
                    if not a.name.startswith("__")  # __version__ is an attribute
                ]
            else:
                out.append((node.lineno, mod))
    return out


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_group_has_a_layer():
    groups = {_group(_module_name(p)) for p in _sources()} - {""}
    assert groups <= set(LAYERS), f"add {sorted(groups - set(LAYERS))} to LAYERS"


def test_imports_run_one_way():
    rank = {g: i for i, g in enumerate(LAYERS)}
    bad = []
    for path in _sources():
        me = _group(_module_name(path))
        if not me:  # cryosiam_nb/__init__.py only imports lazily by name
            continue
        for line, mod in _imports(path):
            other = _group(mod)
            if other and other != me and rank[other] > rank[me]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({me}) imports {mod}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_sim_does_not_import_plotting():
    for path in (PACKAGE / "sim").rglob("*.py"):
        assert not any(_group(m) == "pl" for _, m in _imports(path)), path


def test_import_checker_sees_function_level_and_relative_imports():
    # The checker itself must find lazy imports inside functions and relative imports.
    src = "def f():\n    from cryosiam_nb.pl import static\n\nfrom ..pl import viewer\nimport os\n"
    mods = sorted(m for _, m in _imports_of(src, "cryosiam_nb.sim.probe", False))
    assert mods == ["cryosiam_nb.pl", "cryosiam_nb.pl"]
    assert _group("cryosiam_nb.pl.curation.app") == "pl"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n} lines: split it by job"


def test_no_fallback_imports_of_own_modules():
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            ):
                body = ast.Module(body=node.body, type_ignores=[])
                for sub in ast.walk(body):
                    if isinstance(sub, ast.ImportFrom | ast.Import):
                        names = (
                            [sub.module or ""]
                            if isinstance(sub, ast.ImportFrom)
                            else [a.name for a in sub.names]
                        )
                        if sub.__dict__.get("level", 0) or any(
                            n.startswith("cryosiam_nb") for n in names
                        ):
                            bad.append(f"{path.relative_to(PACKAGE.parent)}:{sub.lineno}")
    assert not bad, "own modules imported under try/except ImportError: " + ", ".join(bad)


def test_tests_do_not_skip_own_modules():
    tests = Path(__file__).resolve().parent
    bad = [
        f"{p.name}:{i}"
        for p in tests.glob("test_*.py")
        if p.name != Path(__file__).name
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "importorskip(" in line and "cryosiam_nb" in line
    ]
    assert not bad, bad


@pytest.mark.parametrize(
    "name",
    ["DIMS", "SEMANTIC_CLASSES", "SEMANTIC_COLORS", "SIZE_CATEGORIES", "TASKS", "DISTANCE_SCALE"],
)
def test_constants_defined_once(name):
    homes = []
    for path in _sources():
        for node in ast.parse(path.read_text()).body:
            targets = (
                [t for t in node.targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                else []
            )
            if any(t.id == name for t in targets):
                homes.append(str(path.relative_to(PACKAGE.parent)))
    assert homes == ["cryosiam_nb/constants.py"], homes


def test_shared_constants_are_the_same_objects():
    from cryosiam_nb import constants, models, sim

    assert sim.SEMANTIC_CLASSES is constants.SEMANTIC_CLASSES
    assert models.TASKS is constants.TASKS
    assert set(constants.SEMANTIC_COLORS) == set(constants.SEMANTIC_CLASSES)
    assert set(constants.DENSE_TASKS) <= set(constants.TASKS)


def test_namespaces_give_functions_every_time():
    # No sub-module may shadow a namespace function (pl.explorer was once a sub-package).
    import cryosiam_nb.pl.curation.app  # noqa: F401  (binds pl.curation, must not bind pl.explorer)
    from cryosiam_nb import pl, tl

    for ns in (pl, tl):
        for name in ns.__all__:
            assert callable(getattr(ns, name)), f"{ns.__name__}.{name}"
            assert not isinstance(getattr(ns, name), type(pl)), f"{ns.__name__}.{name} is a module"
