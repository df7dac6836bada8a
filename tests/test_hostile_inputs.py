"""Hostile inputs and crashes (issue 19): every refusal names the file and the problem, and
no pre-existing file is touched.

Each case builds its files under ``tmp_path``, then runs one call; the table gives the
exception type and a pattern that must appear in the message (besides the file's name).
"""

from __future__ import annotations

import bz2
import errno
import gzip
import os
import re
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryosiam_nb import io, models

torch.set_num_threads(1)


class Payload:
    """An arbitrary pickled object (unpickling such things can run code)."""

    def __init__(self) -> None:
        self.note = "not plain data"


# --------------------------------------------------------------------------- helpers
def _mrc(path: Path, data: np.ndarray | None = None, voxel_size: float = 6.8, **header) -> Path:
    data = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8) if data is None else data
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = voxel_size
        for k, v in header.items():
            setattr(m.header, k, v)
    return path


def _patch_int32(path: Path, word: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[4 * word : 4 * word + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


def _vol(vs: float = 5.0):
    return io.as_dataarray(np.random.default_rng(0).normal(size=(4, 6, 8)).astype("f4"), vs)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


def _ckpt(tmp: Path, name: str, edit: Callable[[dict], None], legacy: bool = False) -> Path:
    model = models.build("denoise", "tiny")
    path = tmp / name
    models.save(model, path)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


def _first_weight(ckpt: dict) -> str:
    return next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())


# --------------------------------------------------------------------------- cases
def case_negative_dims(tmp):
    p = _mrc(tmp / "neg.mrc")
    _patch_int32(p, 0, -8)  # nx
    return p, lambda: io.read(p)


def case_volume_stack(tmp):
    p = _mrc(tmp / "stack.mrc", ispg=401, mz=2)
    return p, lambda: io.read(p)


def case_bad_axis_map(tmp):
    p = _mrc(tmp / "axes.mrc", mapc=1, mapr=1, maps=3)
    return p, lambda: io.read(p)


def case_anisotropic(tmp):
    p = _mrc(tmp / "aniso.mrc")
    with mrcfile.open(p, mode="r+") as m:
        m.voxel_size = (6.8, 6.8, 13.6)
    return p, lambda: io.read(p)


def case_anisotropic_ome_zarr(tmp):
    import zarr

    p = tmp / "aniso.zarr"
    g = zarr.open_group(str(p), mode="w")
    g.create_array("0", data=np.arange(48, dtype="f4").reshape(2, 4, 6), chunks=(2, 4, 6))
    scale = [{"type": "scale", "scale": [2.0, 1.0, 1.0]}]
    g.attrs["multiscales"] = [
        {
            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": scale}],
        }
    ]
    return p, lambda: io.read(p)


def case_truncated_gzip(tmp):
    raw = gzip.compress(_mrc(tmp / "plain.mrc").read_bytes())
    (tmp / "plain.mrc").unlink()
    p = tmp / "cut.mrc.gz"
    p.write_bytes(raw[: len(raw) // 2])
    return p, lambda: io.read(p)


def case_2d(tmp):
    p = _mrc(tmp / "flat.mrc", np.zeros((6, 8), np.float32) + np.arange(8, dtype=np.float32))
    return p, lambda: io.read(p)


def case_write_txt(tmp):
    p = tmp / "notes.txt"
    p.write_text("my notes\n")
    return p, lambda: io.write(_vol(), p, overwrite=True)


def case_write_no_suffix(tmp):
    p = tmp / "output"
    return p, lambda: io.write(_vol(), p, overwrite=True)


def case_file_where_zarr_goes(tmp):
    p = tmp / "out.zarr"
    p.write_text("a plain file")
    return p, lambda: io.write(_vol(), p, overwrite=True)


def case_dir_without_zarr_metadata(tmp):
    p = tmp / "out.zarr"
    p.mkdir()
    (p / "thesis.tex").write_text("precious")
    return p, lambda: io.write(_vol(), p, overwrite=True)


def case_text_where_mrc_goes(tmp):
    p = tmp / "out.mrc"
    p.write_text("not an MRC")
    return p, lambda: io.write(_vol(), p, overwrite=True)


def case_dir_where_mrc_goes(tmp):
    p = tmp / "out.mrc"
    p.mkdir()
    (p / "keep.txt").write_text("keep")
    return p, lambda: io.write(_vol(), p, overwrite=True)


def case_output_is_input(tmp):
    p = _mrc(tmp / "F.mrc")
    return p, lambda: io.write(io.read(p) * 2, p, overwrite=True)


def case_exists_no_overwrite(tmp):
    p = _mrc(tmp / "exists.mrc")
    return p, lambda: io.write(_vol(), p)


def case_ckpt_text(tmp):
    p = tmp / "model.pt"
    p.write_text("these are not weights\n")
    return p, lambda: models.load(p)


def case_ckpt_empty(tmp):
    p = tmp / "empty.pt"
    p.write_bytes(b"")
    return p, lambda: models.load(p)


def case_ckpt_version_newer(tmp):
    p = _ckpt(tmp, "v99.pt", lambda c: c.update(format_version=99))
    return p, lambda: models.load(p)


def case_ckpt_version_string(tmp):
    p = _ckpt(tmp, "vstr.pt", lambda c: c.update(format_version="1"))
    return p, lambda: models.load(p)


def case_ckpt_no_state_dict(tmp):
    p = _ckpt(tmp, "nosd.pt", lambda c: c.pop("state_dict"))
    return p, lambda: models.load(p)


def case_ckpt_string_config(tmp):
    p = _ckpt(tmp, "strcfg.pt", lambda c: c.update(config="tiny denoise"))
    return p, lambda: models.load(p)


def case_ckpt_float64(tmp):
    def edit(c):
        k = _first_weight(c)
        c["state_dict"][k] = c["state_dict"][k].double()

    p = _ckpt(tmp, "f64.pt", edit)
    return p, lambda: models.load(p)


def case_ckpt_nan(tmp):
    def edit(c):
        c["state_dict"][_first_weight(c)].view(-1)[0] = float("nan")

    p = _ckpt(tmp, "nan.pt", edit)
    return p, lambda: models.load(p)


def case_ckpt_legacy_pickle_untrusted(tmp):
    p = _ckpt(tmp, "legacy.pt", lambda c: c.update(extra=Payload()), legacy=True)
    return p, lambda: models.load(p)


CASES = [
    (case_negative_dims, io.InputError, "negative dimensions"),
    (case_volume_stack, io.InputError, "volume stack"),
    (case_bad_axis_map, io.InputError, "mapc/mapr/maps"),
    (case_anisotropic, io.InputError, "anisotropic voxel size.*voxel_size="),
    (case_anisotropic_ome_zarr, io.InputError, "anisotropic voxel size.*z=20, y=10, x=10"),
    (case_truncated_gzip, io.InputError, "gzip-compressed MRC cannot be decompressed"),
    (case_2d, io.InputError, "2-D image"),
    (case_write_txt, io.InputError, "unknown output format '.txt'"),
    (case_write_no_suffix, io.InputError, "unknown output format"),
    (case_file_where_zarr_goes, io.InputError, "refusing to replace.*not a zarr store"),
    (case_dir_without_zarr_metadata, io.InputError, "refusing to replace.*not a zarr store"),
    (case_text_where_mrc_goes, io.InputError, "refusing to replace.*not an MRC file"),
    (case_dir_where_mrc_goes, io.InputError, "refusing to replace.*not an MRC file"),
    (case_output_is_input, io.InputError, "is the file this volume is read from"),
    (case_exists_no_overwrite, FileExistsError, "already exists.*overwrite=True"),
    (case_ckpt_text, io.InputError, "not a PyTorch checkpoint.*text file"),
    (case_ckpt_empty, io.InputError, "not a PyTorch checkpoint.*empty"),
    (case_ckpt_version_newer, io.InputError, "format version 99 is newer"),
    (case_ckpt_version_string, io.InputError, "invalid checkpoint format_version '1'"),
    (case_ckpt_no_state_dict, io.InputError, "state_dict is missing"),
    (case_ckpt_string_config, io.InputError, "invalid model config.*expected a dict.*str"),
    (case_ckpt_float64, io.InputError, "dtype mismatches.*float64"),
    (case_ckpt_nan, io.InputError, "NaN or Inf weights"),
    (case_ckpt_legacy_pickle_untrusted, io.InputError, "arbitrary code.*trusted=True"),
]


@pytest.mark.parametrize(("make", "exc", "pattern"), CASES, ids=[c[0].__name__[5:] for c in CASES])
def test_hostile_input_is_refused_clearly(tmp_path, make, exc, pattern):
    path, action = make(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(exc) as err:
        action()
    msg = str(err.value)
    assert str(path) in msg, msg
    assert re.search(pattern, msg, flags=re.S), msg
    assert "Traceback" not in msg
    assert _snapshot(tmp_path) == before  # pre-existing files untouched, nothing left behind


# --------------------------------------------------------------------------- read correctly
@pytest.mark.parametrize(
    ("name", "squeeze"),
    [
        ("c.mrc.gz", lambda b: gzip.compress(b)),
        ("c0.mrc", lambda b: gzip.compress(b, compresslevel=0)),  # found by magic bytes
        ("c.mrc.bz2", lambda b: bz2.compress(b)),
    ],
)
def test_compressed_mrc_is_read_correctly(tmp_path, name, squeeze):
    vol = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    raw = _mrc(tmp_path / "plain.mrc", vol, voxel_size=4.2).read_bytes()
    p = tmp_path / name
    p.write_bytes(squeeze(raw))
    t = io.read(p)
    assert t.shape == (5, 6, 7)
    assert t.attrs["voxel_size"] == pytest.approx(4.2, rel=1e-5)
    np.testing.assert_array_equal(t.values, vol)


def test_axis_map_is_transposed_to_zyx(tmp_path):
    zyx = np.random.default_rng(2).normal(size=(3, 4, 5)).astype(np.float32)
    # Columns run along z, rows along y, sections along x: stored array is (x, y, z).
    stored = np.ascontiguousarray(zyx.transpose(2, 1, 0))
    p = _mrc(tmp_path / "swapped.mrc", stored, mapc=3, mapr=2, maps=1)
    t = io.read(p, voxel_size=5.0, chunks=(2, 2, 2))
    assert t.shape == (3, 4, 5)
    np.testing.assert_array_equal(t.values, zyx)


def test_anisotropic_header_accepted_with_explicit_voxel_size(tmp_path):
    p, _ = case_anisotropic(tmp_path)
    assert io.read(p, voxel_size=7.0).attrs["voxel_size"] == 7.0


def test_constant_volume_warns(tmp_path):
    p = _mrc(tmp_path / "const.mrc", np.full((4, 6, 8), 3.0, np.float32))
    with pytest.warns(UserWarning, match=r"const\.mrc.*constant"):
        io.read(p)


def test_trusted_legacy_pickle_loads(tmp_path):
    p = _ckpt(tmp_path, "legacy.pt", lambda c: c.update(extra=Payload()), legacy=True)
    assert models.load(p, trusted=True).task == "denoise"


# --------------------------------------------------------------------------- disk trouble
def test_full_disk_names_output_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "big.mrc"
    io.write(_vol(1.0), out)
    before = _snapshot(tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError) as err:
        io.write(_vol(2.0), out, overwrite=True)
    assert err.value.errno == errno.ENOSPC
    assert str(out) in str(err.value) and ".tmp-" not in str(err.value)
    assert _snapshot(tmp_path) == before


def test_read_only_folder_error_names_output(tmp_path, monkeypatch):
    out = tmp_path / "ro" / "o.mrc"
    out.parent.mkdir()
    real_new_mmap = mrcfile.new_mmap

    def denied(name, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(name))

    monkeypatch.setattr(mrcfile, "new_mmap", denied)
    with pytest.raises(PermissionError) as err:
        io.write(_vol(), out)
    assert err.value.filename == str(out) and ".tmp-" not in str(err.value)
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(mrcfile, "new_mmap", real_new_mmap)


# --------------------------------------------------------------------------- atomic_path
def _zarr(path: Path, value: float) -> Path:
    return io.write(
        io.as_dataarray(np.full((2, 3, 4), value, np.float32), 4.0), path, overwrite=True
    )


@pytest.mark.parametrize("fail_at", [1, 2])
def test_directory_replace_restores_old_on_failure(tmp_path, monkeypatch, fail_at):
    from cryosiam_nb.io import _atomic

    out = _zarr(tmp_path / "o.zarr", 1.0)
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)  # the two-rename path
    real_rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_at:
            raise OSError(errno.EIO, "simulated crash")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="simulated crash"):
        _zarr(out, 2.0)
    monkeypatch.setattr(os, "rename", real_rename)
    assert out.is_dir() and float(io.read(out, check_values=False).values.max()) == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["o.zarr"]


def test_file_replace_is_one_os_replace(tmp_path, monkeypatch):
    out = tmp_path / "a.json"
    io.write_json({"v": 1}, out)
    real, calls = os.replace, []

    def spy(src, dst):
        calls.append((src, dst))
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(os, "replace", spy)
    with pytest.raises(OSError):
        io.write_json({"v": 2}, out)
    monkeypatch.setattr(os, "replace", real)
    assert len(calls) == 1 and out.read_text().count('"v": 1') == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_directory_swap_is_atomic_where_supported(tmp_path, monkeypatch):
    out = _zarr(tmp_path / "o.zarr", 1.0)
    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(AssertionError("2-step")))
    from cryosiam_nb.io import _atomic

    if not _atomic._exchange(tmp_path / "o.zarr", tmp_path / "o.zarr"):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available here")
    _zarr(out, 2.0)
    assert float(io.read(out, check_values=False).values.max()) == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["o.zarr"]


def test_stale_siblings_are_cleaned_and_a_lost_target_restored(tmp_path):
    out = _zarr(tmp_path / "o.zarr", 1.0)
    old = tmp_path / ".o.zarr.old-99999999-deadbeef"  # a crash after "move old aside"
    os.rename(out, old)
    (tmp_path / ".o.zarr.tmp-99999999-cafecafe").mkdir()  # a crashed half-written store
    (tmp_path / ".o.zarr.tmp-0badf00d").write_text("half")  # older naming, no pid
    with pytest.raises(RuntimeError, match="boom"), io.atomic_path(out):
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["o.zarr"]
    assert float(io.read(out, check_values=False).values.max()) == 1.0
