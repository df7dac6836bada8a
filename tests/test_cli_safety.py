"""The `cryosiam-nb` command loses nothing (issue 19) and `explore` takes its options (issue 22).

Every refusal test checks three things: the exit code, a one-line message on stderr that names
the file and the problem (never a traceback), and that every file that existed before is
byte-for-byte and mtime-for-mtime untouched.
"""

from __future__ import annotations

import argparse
import errno
import os
from importlib import metadata
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryosiam_nb import cli, io, models
from cryosiam_nb.cli import _safety
from cryosiam_nb.particles import Particles

SHAPE = (20, 40, 40)


# --------------------------------------------------------------------------- helpers
def _mrc(path: Path, voxel_size: float = 10.0, seed: int = 0, shape=SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = voxel_size
    return path


def _zarr(path: Path, voxel_size: float | None = 10.0) -> Path:
    import zarr

    z = zarr.create_array(store=str(path), shape=SHAPE, chunks=SHAPE, dtype="f4")
    z[:] = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    if voxel_size is not None:
        z.attrs["voxel_size"] = voxel_size
    return path


def _particles(path: Path, n: int = 30, cluster: bool = True) -> Path:
    rng = np.random.default_rng(0)
    lab = np.arange(n) % 3
    obs = pd.DataFrame(
        {
            "tomogram": "tomo",
            "z": rng.uniform(2, 18, n),
            "y": rng.uniform(2, 38, n),
            "x": rng.uniform(2, 38, n),
            "voxel_size": 10.0,
            "excluded": False,
            "score": rng.uniform(size=n),
        },
        index=[f"p{i:03d}" for i in range(n)],
    )
    if cluster:
        obs["cluster"] = lab.astype(str)
    emb = np.eye(6)[lab * 2] + rng.normal(scale=0.05, size=(n, 6))
    Particles(obs, obsm={"embedding": emb, "umap": rng.normal(size=(n, 2))}).save(path)
    return path


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        data = p.read_bytes() if p.is_file() else None
        out[str(p.relative_to(root))] = (data, p.lstat().st_mtime_ns)
    return out


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _assert_clean_error(err: str, *words: str) -> None:
    assert err.startswith("error: "), err
    assert "Traceback" not in err and ".tmp-" not in err and ".old-" not in err, err
    for w in words:
        assert w in err, (w, err)


# --------------------------------------------------------------------------- 1. data safety
def _case_same(t: Path):
    f = _mrc(t / "F.mrc")
    return ["denoise", f, f], f, "is the input"


def _case_normalize_same(t: Path):
    g = _mrc(t / "G.mrc")
    return ["normalize", g, g], g, "is the input"


def _case_segment_same(t: Path):
    f = _mrc(t / "F.mrc")
    return ["segment", f, f], f, "is the input"


def _case_instances_same(t: Path):
    f = _mrc(t / "out" / "instances.mrc")
    return ["instances", f, t / "out", "--format", "mrc"], f, "is the input"


def _case_hard_link(t: Path):
    f = _mrc(t / "F.mrc")
    os.link(f, t / "H.mrc")
    return ["normalize", f, t / "H.mrc", "--overwrite"], t / "H.mrc", "hard link of the input"


def _case_symlink(t: Path):
    f = _mrc(t / "F.mrc")
    (t / "S.mrc").symlink_to(f)
    return ["normalize", f, t / "S.mrc", "--overwrite"], t / "S.mrc", "links to the input"


def _case_symlinked_folder(t: Path):
    f = _mrc(t / "data" / "F.mrc")
    (t / "alias").symlink_to(t / "data")
    out = t / "alias" / "F.mrc"
    return ["denoise", f, out, "--overwrite"], out, "links to the input"


def _case_inside_input_store(t: Path):
    z = _zarr(t / "Z.zarr")
    out = z / "sub.zarr"
    return ["normalize", z, out], out, "lies inside the input"


def _case_contains_input(t: Path):
    f = _mrc(t / "D.zarr" / "in.mrc")
    return ["normalize", f, t / "D.zarr", "--overwrite"], t / "D.zarr", "contains the input"


def _case_maps_is_input(t: Path):
    z = _zarr(t / "Z.zarr")
    return ["segment", z, t / "s.mrc", "--maps", z], z, "is the input"


def _case_embed_store_is_input(t: Path):
    z = _zarr(t / "Z.zarr")
    (t / "table.csv").write_text("z,y,x\n1,2,3\n")
    return ["embed", z, t / "table.csv", z], z, "is the input"


def _case_cluster_output_links(t: Path):
    p = _particles(t / "p.zarr")
    (t / "link.zarr").symlink_to(p)
    return ["cluster", p, "--output", t / "link.zarr"], t / "link.zarr", "links to the input"


def _case_demo_mrc_inside_out(t: Path):
    f = _mrc(t / "demo" / "tomo.mrc")
    (t / "demo" / "report.html").write_text("<html></html>")
    return (
        ["demo", "--mrc", f, "--out", t / "demo", "--overwrite"],
        t / "demo",
        "contains the input",
    )


SAME_CASES = {
    "denoise F F": _case_same,
    "normalize G G": _case_normalize_same,
    "segment F F": _case_segment_same,
    "instances: instances.mrc is the input": _case_instances_same,
    "hard link": _case_hard_link,
    "symlink": _case_symlink,
    "path through a symlinked folder": _case_symlinked_folder,
    "output inside an input store": _case_inside_input_store,
    "output store contains the input": _case_contains_input,
    "segment --maps is the input": _case_maps_is_input,
    "embed output is the tomogram": _case_embed_store_is_input,
    "cluster --output is a link to the input": _case_cluster_output_links,
    "demo --mrc inside --out": _case_demo_mrc_inside_out,
}


@pytest.mark.parametrize("case", list(SAME_CASES), ids=list(SAME_CASES))
def test_output_that_resolves_to_an_input_is_refused(case, tmp_path, capsys):
    argv, named, problem = SAME_CASES[case](tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 2
    _assert_clean_error(err, str(named), problem, "choose another output path")
    assert _snapshot(tmp_path) == before


def _exists_normalize(t: Path):
    f, out = _mrc(t / "F.mrc"), _mrc(t / "out.mrc", seed=3)
    return ["normalize", f, out], out


def _exists_zarr(t: Path):
    f, out = _mrc(t / "F.mrc"), _zarr(t / "out.zarr")
    return ["denoise", f, out], out


def _exists_simulate(t: Path):
    (t / "sim").mkdir()
    (t / "sim" / "manifest.json").write_text("{}")
    return ["simulate", t / "sim", "--shape", "8", "16", "16", "--mode", "fast"], t / "sim"


def _exists_instances_table(t: Path):
    f = _mrc(t / "F.mrc")
    (t / "out").mkdir()
    (t / "out" / "particles.csv").write_text("# cryosiam_nb particles\nx_A,y_A,z_A\n")
    return ["instances", f, t / "out"], t / "out" / "particles.csv"


def _exists_cluster(t: Path):
    p, q = _particles(t / "p.zarr"), _particles(t / "q.zarr")
    return ["cluster", p, "--output", q, "--k", "3"], q


def _exists_demo(t: Path):
    (t / "demo").mkdir()
    (t / "demo" / "report.html").write_text("<html></html>")
    return ["demo", "--out", t / "demo", "--fast"], t / "demo"


EXISTS_CASES = {
    "normalize → MRC": _exists_normalize,
    "denoise → zarr": _exists_zarr,
    "simulate → dataset": _exists_simulate,
    "instances → particles.csv": _exists_instances_table,
    "cluster --output": _exists_cluster,
    "demo --out": _exists_demo,
}


@pytest.mark.parametrize("case", list(EXISTS_CASES), ids=list(EXISTS_CASES))
def test_no_overwrite_is_the_default(case, tmp_path, capsys):
    argv, named = EXISTS_CASES[case](tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 2
    _assert_clean_error(err, str(named), "already exists", "--overwrite")
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_our_own_output(tmp_path, capsys):
    f, out = _mrc(tmp_path / "F.mrc"), _mrc(tmp_path / "out.mrc", seed=3)
    src, old = f.read_bytes(), out.read_bytes()
    assert _run(["normalize", f, out, "--overwrite"], capsys)[0] == 0
    assert out.read_bytes() != old and f.read_bytes() == src
    data = io.read(out)
    assert data.shape == SHAPE and data.attrs["voxel_size"] == pytest.approx(10.0)
    assert 0.0 <= float(data.min()) and float(data.max()) <= 1.0


def _foreign_text_as_mrc(t: Path):
    (t / "notes.mrc").write_text("my notes\n")
    return ["normalize", _mrc(t / "F.mrc"), t / "notes.mrc"], t / "notes.mrc", "a file"


def _foreign_dir_as_mrc(t: Path):
    (t / "out.mrc").mkdir()
    (t / "out.mrc" / "keep.txt").write_text("x")
    return ["denoise", _mrc(t / "F.mrc"), t / "out.mrc"], t / "out.mrc", "a directory"


def _foreign_dir_as_zarr(t: Path):
    (t / "out.zarr").mkdir()
    (t / "out.zarr" / "thesis.tex").write_text("x")
    return ["normalize", _mrc(t / "F.mrc"), t / "out.zarr"], t / "out.zarr", "not a zarr volume"


def _foreign_simulate_folder(t: Path):
    (t / "home").mkdir()
    (t / "home" / "data.txt").write_text("precious")
    return ["simulate", t / "home", "--mode", "fast"], t / "home", "a directory"


def _foreign_demo_folder(t: Path):
    (t / "proj").mkdir()
    (t / "proj" / "particles.csv").write_text("my picks\n")
    return ["demo", "--out", t / "proj", "--fast"], t / "proj", "a directory"


def _foreign_table(t: Path):
    (t / "out").mkdir()
    (t / "out" / "particles.csv").write_text("name,score\nmine,1\n")
    table = t / "out" / "particles.csv"
    return ["instances", _mrc(t / "F.mrc"), t / "out"], table, "a file"


def _foreign_cluster_output(t: Path):
    (t / "q.zarr").mkdir()
    (t / "q.zarr" / "notes.txt").write_text("x")
    return ["cluster", _particles(t / "p.zarr"), "--output", t / "q.zarr"], t / "q.zarr", "dir"


def _foreign_maps(t: Path):
    (t / "m.zarr").write_text("not a store")
    argv = ["segment", _mrc(t / "F.mrc"), t / "s.mrc", "--maps", t / "m.zarr"]
    return argv, t / "m.zarr", "a file"


def _foreign_symlink(t: Path):
    (t / "elsewhere.mrc").write_bytes(_mrc(t / "x" / "a.mrc").read_bytes())
    (t / "out.mrc").symlink_to(t / "elsewhere.mrc")
    return ["normalize", _mrc(t / "F.mrc"), t / "out.mrc"], t / "out.mrc", "a symbolic link"


def _volume_over_particles(t: Path):
    p = _particles(t / "p.zarr")
    return ["normalize", _mrc(t / "F.mrc"), p], p, "not a zarr volume store"


def _particles_over_volume(t: Path):
    vol = _zarr(t / "vol.zarr")
    (t / "t.csv").write_text("z,y,x\n1,2,3\n")
    return ["embed", _mrc(t / "F.mrc"), t / "t.csv", vol], vol, "not a Particles zarr store"


FOREIGN_CASES = {
    "a volume over a Particles store": _volume_over_particles,
    "a Particles store over a volume": _particles_over_volume,
    "text file named .mrc": _foreign_text_as_mrc,
    "folder named .mrc": _foreign_dir_as_mrc,
    "folder named .zarr": _foreign_dir_as_zarr,
    "simulate into a user folder": _foreign_simulate_folder,
    "demo into a user folder": _foreign_demo_folder,
    "instances over a foreign CSV": _foreign_table,
    "cluster --output over a folder": _foreign_cluster_output,
    "segment --maps over a file": _foreign_maps,
    "symlink to another MRC": _foreign_symlink,
}


@pytest.mark.parametrize("case", list(FOREIGN_CASES), ids=list(FOREIGN_CASES))
def test_only_outputs_of_ours_are_replaced(case, tmp_path, capsys):
    argv, named, kind = FOREIGN_CASES[case](tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = _run([*argv, "--overwrite"], capsys)
    assert code == 2
    _assert_clean_error(err, str(named), "refusing to replace it", kind)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "argv_tail",
    [
        ["out.txt"],
        ["out"],
        ["notes.txt"],
    ],
)
def test_output_suffix_decides_the_format(argv_tail, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = _mrc(tmp_path / "F.mrc")
    (tmp_path / "notes.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    code, _, err = _run(["denoise", f, *argv_tail, "--overwrite"], capsys)
    assert code == 2
    _assert_clean_error(err, argv_tail[0], "unknown output format", ".mrc", ".zarr")
    assert _snapshot(tmp_path) == before


def test_embed_output_must_be_a_zarr_store(tmp_path, capsys):
    f = _mrc(tmp_path / "F.mrc")
    (tmp_path / "t.csv").write_text("z,y,x\n1,2,3\n")
    before = _snapshot(tmp_path)
    code, _, err = _run(["embed", f, tmp_path / "t.csv", tmp_path / "t.csv"], capsys)
    assert code == 2
    _assert_clean_error(err, "t.csv", "unknown output format", ".zarr")
    assert _snapshot(tmp_path) == before


def test_normalize_writes_mrc_or_zarr_by_suffix(tmp_path, capsys):
    f = _mrc(tmp_path / "F.mrc", voxel_size=7.0)
    for name in ("n.mrc", "n.zarr"):
        assert _run(["normalize", f, tmp_path / name], capsys)[0] == 0
        back = io.read(tmp_path / name)
        assert back.shape == SHAPE and back.attrs["voxel_size"] == pytest.approx(7.0)
    assert mrcfile.validate(str(tmp_path / "n.mrc"), print_file=open(os.devnull, "w"))
    assert (tmp_path / "n.zarr").is_dir()


@pytest.mark.parametrize(
    ("cmd", "extra", "out", "integer"),
    [
        ("denoise", [], "d.mrc", False),
        ("segment", ["--maps", "maps.zarr"], "s.mrc", True),
        ("instances", ["--format", "mrc", "--min-size", "2"], "inst/instances.mrc", True),
    ],
)
def test_every_volume_result_can_be_mrc(cmd, extra, out, integer, tmp_path, capsys):
    f = _mrc(tmp_path / "F.mrc", voxel_size=10.0)
    dest = tmp_path / "inst" if cmd == "instances" else tmp_path / out
    extra = [str(tmp_path / e) if e.endswith(".zarr") else e for e in extra]
    code, stdout, err = _run([cmd, f, dest, *extra, "--device", "cpu"], capsys)
    assert code == 0, err
    vol = io.read(tmp_path / out, dtype=None)
    assert io.is_mrc_file(tmp_path / out)
    assert vol.shape == SHAPE and vol.attrs["voxel_size"] == pytest.approx(10.0)
    assert np.issubdtype(vol.dtype, np.integer) == integer
    if cmd == "segment":
        import xarray as xr

        maps = xr.open_zarr(tmp_path / "maps.zarr", consolidated=False)
        np.testing.assert_array_equal(maps["labels"].values, vol.values)
        assert "probabilities" in maps and "0=background" in stdout
    if cmd == "instances":
        assert (tmp_path / "inst" / "particles.csv").is_file()


# --------------------------------------------------------------------------- 2. errors
def _patched_write(exc_factory):
    def fake(data, path, overwrite=False, **kw):
        raise exc_factory(Path(path))

    return fake


def _tmp_name(p: Path) -> str:
    return str(p.with_name(f".{p.name}.tmp-4242-0123abcd"))


OSERRORS = {
    "permission denied on the temp file": (
        lambda p: PermissionError(errno.EACCES, "Permission denied", _tmp_name(p)),
        "Permission denied",
        1,
    ),
    "read-only file system": (
        lambda p: OSError(errno.EROFS, "Read-only file system", _tmp_name(p) + "/zarr.json"),
        "Read-only file system",
        1,
    ),
    "disk full, no file name": (
        lambda p: OSError(errno.ENOSPC, "No space left on device"),
        "No space left on device",
        1,
    ),
    "exists (io's message)": (
        lambda p: FileExistsError(f"{p}: already exists (pass overwrite=True to replace it)"),
        "pass --overwrite",
        2,
    ),
    "is a directory": (
        lambda p: IsADirectoryError(errno.EISDIR, "Is a directory", str(p)),
        "Is a directory",
        1,
    ),
}


@pytest.mark.parametrize("case", list(OSERRORS), ids=list(OSERRORS))
def test_any_oserror_is_one_line_naming_the_output(case, tmp_path, capsys, monkeypatch):
    factory, reason, code_wanted = OSERRORS[case]
    f, out = _mrc(tmp_path / "F.mrc"), tmp_path / "out.mrc"
    monkeypatch.setattr(io, "write", _patched_write(factory))
    before = _snapshot(tmp_path)
    code, _, err = _run(["normalize", f, out], capsys)
    assert code == code_wanted
    assert err == f"error: {out}: {reason}\n" or (
        err.startswith(f"error: {out}: ") and reason in err
    ), err
    _assert_clean_error(err)
    assert _snapshot(tmp_path) == before


def test_read_only_folder_names_the_output_not_the_temp_file(tmp_path, capsys, monkeypatch):
    # What the OS says when the folder is read-only: the temporary sibling cannot be created.
    def new_mmap(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(name))

    monkeypatch.setattr(mrcfile, "new_mmap", new_mmap)
    f, out = _mrc(tmp_path / "F.mrc"), tmp_path / "ro" / "out.mrc"
    out.parent.mkdir()
    before = _snapshot(tmp_path)
    code, _, err = _run(["normalize", f, out], capsys)
    assert code == 1
    assert err == f"error: {out}: Permission denied\n"
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_for_real(tmp_path, capsys):
    f, ro = _mrc(tmp_path / "F.mrc"), tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = _run(["normalize", f, ro / "out.mrc"], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 1
    _assert_clean_error(err, str(ro / "out.mrc"), "Permission denied")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize(
    ("exc", "outputs", "want"),
    [
        (PermissionError(13, "Permission denied", "/d/.o.mrc.tmp-1-0123abcd"), [], "/d/o.mrc: "),
        (
            OSError(30, "Read-only file system", "/d/.o.zarr.tmp-9-deadbeef/a/zarr.json"),
            [],
            "/d/o.zarr: ",
        ),
        (OSError(16, "Device busy", "/d/.o.zarr.old-77-00ff00ff"), [], "/d/o.zarr: "),
        (OSError(28, "No space left on device"), [Path("/d/o.mrc")], "/d/o.mrc: No space"),
        (FileExistsError("/d/o.mrc: already exists (pass overwrite=True)"), [], "--overwrite"),
        (OSError("disk quota exceeded"), [Path("/d/o.mrc")], "/d/o.mrc: disk quota"),
        (IsADirectoryError(21, "Is a directory", b"/d/x.csv"), [], "/d/x.csv: Is a directory"),
    ],
)
def test_describe_oserror(exc, outputs, want):
    text = _safety.describe_oserror(exc, outputs)
    assert want in text and ".tmp-" not in text and ".old-" not in text, text
    assert text.startswith("/d/"), text


# --------------------------------------------------------------------------- 3. voxel size
def _unset_mrc(t: Path, vs: float) -> Path:
    return _mrc(t / f"vs{vs:g}.mrc", voxel_size=vs)


UNSET = {
    "MRC voxel 0": lambda t: _unset_mrc(t, 0.0),
    "MRC voxel 1 Å": lambda t: _unset_mrc(t, 1.0),
    "MRC voxel negative": lambda t: _unset_mrc(t, -5.0),
    "zarr without voxel_size": lambda t: _zarr(t / "plain.zarr", voxel_size=None),
}


@pytest.mark.parametrize("cmd", ["normalize", "denoise"])
@pytest.mark.parametrize("case", list(UNSET), ids=list(UNSET))
def test_unset_voxel_size_is_refused(case, cmd, tmp_path, capsys):
    src = UNSET[case](tmp_path)
    out = tmp_path / "out.mrc"
    before = _snapshot(tmp_path)
    code, _, err = _run([cmd, src, out, "--device", "cpu"], capsys)
    assert code == 2
    _assert_clean_error(err, str(src), "voxel size", "--voxel-size")
    assert _snapshot(tmp_path) == before and not out.exists()


def test_explicit_voxel_size_is_used(tmp_path, capsys):
    src = _unset_mrc(tmp_path, 1.0)
    assert _run(["normalize", src, tmp_path / "o.mrc", "--voxel-size", "8.5"], capsys)[0] == 0
    assert io.read(tmp_path / "o.mrc").attrs["voxel_size"] == pytest.approx(8.5)


@pytest.mark.parametrize("value", ["0", "-3", "nan", "abc"])
def test_bad_voxel_size_option_is_an_argument_error(value, tmp_path, capsys):
    src = _mrc(tmp_path / "F.mrc")
    with pytest.raises(SystemExit) as exc:
        cli.main(["normalize", str(src), str(tmp_path / "o.mrc"), "--voxel-size", value])
    assert exc.value.code == 2
    assert "--voxel-size" in capsys.readouterr().err
    assert not (tmp_path / "o.mrc").exists()


def test_demo_refuses_unset_voxel_size_of_mrc(tmp_path, capsys):
    src = _unset_mrc(tmp_path, 0.0)
    code, _, err = _run(["demo", "--mrc", src, "--out", tmp_path / "demo"], capsys)
    assert code == 2
    _assert_clean_error(err, str(src), "--voxel-size")
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------- 4. help etc.
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    ap = cli.build_parser()
    action = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(set(_subparsers()) - {"train"}))
def test_every_argument_has_help_and_its_default(name):
    p = _subparsers()[name]
    text = " ".join(p.format_help().split())
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help and len(a.help) > 8, (name, a.dest)
        shown_default = a.default not in (None, False, argparse.SUPPRESS) and a.option_strings
        if shown_default:
            assert f"(default: {a.default}" in text or "default" in a.help, (name, a.dest)
        if a.default is None and a.option_strings:
            assert "default" in a.help, (name, a.dest)
    if name in ("normalize", "denoise", "segment", "instances", "embed", "simulate", "demo"):
        assert "--overwrite" in text
    if name not in ("explore", "models", "demo"):
        assert "--progress" in text and "--no-progress" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cryosiam-nb {metadata.version('cryosiam-nb')}"


def test_models_lists_the_shipped_models(capsys):
    code, out, _ = _run(["models"], capsys)
    assert code == 0
    names = models.list_models()
    assert names
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in names:
        m = models.load(name, device="cpu")
        row = lines[name]
        assert f" {m.task} " in row
        assert f"{m.voxel_size:g} Å" in row
        assert "×".join(map(str, m.patch_size)) in row
        for c in m.class_names or ():
            assert c in row


def test_progress_is_quiet_when_stdout_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    f = _mrc(tmp_path / "F.mrc")
    code, out, _ = _run(["normalize", f, tmp_path / "a.mrc"], capsys)
    assert code == 0 and "Completed" not in out and "%" not in out
    code, out, _ = _run(["normalize", f, tmp_path / "b.mrc", "--progress"], capsys)
    assert code == 0 and "Completed" in out
    monkeypatch.setattr(type(__import__("sys").stdout), "isatty", lambda self: True)
    code, out, _ = _run(["normalize", f, tmp_path / "c.mrc"], capsys)
    assert code == 0 and "Completed" in out
    code, out, _ = _run(["normalize", f, tmp_path / "d.mrc", "--no-progress"], capsys)
    assert code == 0 and "Completed" not in out


def test_cluster_updates_in_place_or_writes_output(tmp_path, capsys):
    p = _particles(tmp_path / "p.zarr")
    before = _snapshot(p)
    code, _, err = _run(["cluster", p, "--k", "3", "--output", tmp_path / "q.zarr"], capsys)
    assert code == 0, err
    assert _snapshot(p) == before  # the input store is untouched
    q = Particles.load(tmp_path / "q.zarr")
    assert q.obs["cluster"].nunique() == 3 and "umap" in q.obsm
    assert _run(["cluster", p, "--k", "2"], capsys)[0] == 0  # in place, no --overwrite
    assert Particles.load(p).obs["cluster"].nunique() == 2


# --------------------------------------------------------------------------- 5. explore
def test_explore_passes_tomogram_address_and_color_by(tmp_path, capsys, monkeypatch):
    import panel as pn

    p = _particles(tmp_path / "p.zarr")
    tomo = _mrc(tmp_path / "tomo.mrc", shape=(20, 40, 40))
    seen: dict = {}

    def serve(app, **kwargs):
        seen.update(kwargs, app=app)

    monkeypatch.setattr(pn, "serve", serve)
    code, _, err = _run(
        ["explore", p, "--tomogram", tomo, "--address", "0.0.0.0", "--port", "5123"]
        + ["--color-by", "score"],
        capsys,
    )
    assert code == 0, err
    assert seen["address"] == "0.0.0.0" and seen["port"] == 5123
    view = seen["app"]()  # one browser session: the Explorer with our options
    assert view is not None
    from cryosiam_nb.pl.curation import Explorer

    ex = Explorer(p, tomograms={"tomo": str(tomo)}, color_by="score")
    assert ex.color_by == "score"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--color-by", "nope"], ["--color-by", "nope"]),
        (["--tomogram", "missing.mrc"], ["missing.mrc", "no such file"]),
        (["--tomogram", "=x.mrc"], ["empty NAME"]),
    ],
)
def test_explore_refuses_bad_options_before_serving(extra, words, tmp_path, capsys, monkeypatch):
    import panel as pn

    monkeypatch.chdir(tmp_path)
    p = _particles(tmp_path / "p.zarr")
    monkeypatch.setattr(pn, "serve", lambda *a, **k: pytest.fail("served despite bad options"))
    code, _, err = _run(["explore", p, *extra], capsys)
    assert code == 2
    _assert_clean_error(err, *words)
