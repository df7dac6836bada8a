"""The `cryosiam-nb` command: every subcommand has --help; errors are clean, not tracebacks."""

from __future__ import annotations

import numpy as np
import pytest

from cryosiam_nb import cli, io

SUBCOMMANDS = [
    "simulate",
    "normalize",
    "denoise",
    "segment",
    "instances",
    "embed",
    "cluster",
    "explore",
    "models",
    "demo",
]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: cryosiam-nb " + cmd in capsys.readouterr().out


def test_train_help_lists_recipes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_normalize_command_writes_zarr(tmp_path, write_mrc, rng):
    src = write_mrc(rng.normal(size=(8, 16, 16)).astype(np.float32), voxel_size=7.0)
    assert cli.main(["normalize", str(src), str(tmp_path / "n.zarr")]) == 0
    out = io.read(tmp_path / "n.zarr")
    assert out.attrs["voxel_size"] == pytest.approx(7.0)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_bad_input_gives_message_and_exit_code_2(tmp_path, capsys):
    code = cli.main(["normalize", str(tmp_path / "missing.mrc"), str(tmp_path / "o.zarr")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.mrc" in err and "no such file" in err


def test_dense_commands_pass_test_time_augmentation(tmp_path, write_mrc, rng, monkeypatch):
    """``--tta N`` reaches ``tl.predict`` (off by default); a count above 8 is refused."""
    from cryosiam_nb import tl

    seen, predict = [], tl.predict

    def recorded(data, model, **kwargs):
        seen.append(kwargs.get("tta"))
        return predict(data, model, **kwargs)

    monkeypatch.setattr(tl, "predict", recorded)
    src = write_mrc(rng.normal(size=(16, 32, 32)).astype(np.float32), voxel_size=10.0)
    assert cli.main(["segment", str(src), str(tmp_path / "a.zarr"), "--tta", "2"]) == 0
    assert cli.main(["denoise", str(src), str(tmp_path / "b.zarr")]) == 0
    assert seen == [2, 0]
    with pytest.raises(SystemExit):
        cli.main(["segment", str(src), str(tmp_path / "c.zarr"), "--tta", "9"])
