"""The command line, run as a real subprocess: help, output, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from deepcad_chunked import __version__
from tests.conftest import assert_clean_error, run_cli
from tests.tiffs import movie, write_plain


@pytest.mark.parametrize("command", ["convert", "info", "export"])
def test_every_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: deepcad-chunked " + command in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_convert_info_export(tmp_path: Path) -> None:
    data = movie((50, 37, 53), "uint16")
    src = write_plain(tmp_path / "rec.tif", data)
    out = tmp_path / "rec.zarr"
    result = run_cli("convert", str(src), "-o", str(out), "--workers", "2", "--frame-rate",
                     "30", "--chunks", "16,32,32", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "dask dashboard: http://127.0.0.1:" in result.stderr  # on loopback, link printed
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"))[:], data)

    result = run_cli("info", str(out), "--json")
    assert result.returncode == 0, result.stderr
    desc = json.loads(result.stdout)
    assert desc["complete"] is True and desc["shape"] == [50, 37, 53]
    assert desc["chunks"] == [16, 32, 32] and desc["dtype"] == "uint16"
    assert desc["frame_rate_hz"] == pytest.approx(30.0)
    assert desc["statistics"]["max"] == data.max()
    assert desc["compression_ratio"] > 0

    text = run_cli("info", str(out))
    assert text.returncode == 0 and "30 Hz" in text.stdout and "complete" in text.stdout

    result = run_cli("export", str(out), "-o", str(tmp_path / "back.tif"), "--no-progress")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "back.tif"), data)

    source = json.loads(run_cli("info", str(tmp_path / "back.tif"), "--json").stdout)
    assert source["source_format"] == "ome" and source["shape"] == [50, 37, 53]
    assert source["frame_rate_hz"] == pytest.approx(30.0)  # the export kept the scale


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    good = write_plain(tmp / "good.tif", movie((8, 16, 16), "uint16"))
    (tmp / "notes.tif").write_text("not an image\n" * 50)
    (tmp / "notes.csv").write_text("t,value\n0,1\n")
    trunc = write_plain(tmp / "trunc.tif", movie((30, 32, 32), "uint16"))
    with open(trunc, "r+b") as fh:
        fh.truncate(trunc.stat().st_size // 2)
    (tmp / "mixed").mkdir()
    write_plain(tmp / "mixed" / "m_1.tif", movie((4, 16, 16), "uint16"))
    write_plain(tmp / "mixed" / "m_2.tif", movie((4, 16, 20), "uint16"))
    (tmp / "mixdt").mkdir()
    write_plain(tmp / "mixdt" / "d_1.tif", movie((4, 16, 16), "uint16"))
    write_plain(tmp / "mixdt" / "d_2.tif", movie((4, 16, 16), "float32"))
    (tmp / "empty").mkdir()
    (tmp / "exists.zarr").mkdir()
    (tmp / "exists.zarr" / "zarr.json").write_text("{}")
    out = str(tmp / "out.zarr")
    return {
        "missing source": (["convert", str(tmp / "nope.tif"), "-o", out], ("does not exist",)),
        "not a tiff": (["convert", str(tmp / "notes.tif"), "-o", out], ("not a readable TIFF",)),
        "truncated": (["convert", str(trunc), "-o", out], ("truncated",)),
        "frame shapes differ": (["convert", str(tmp / "mixed"), "-o", out], ("m_2.tif",)),
        "dtypes differ": (["convert", str(tmp / "mixdt"), "-o", out], ("float32",)),
        "empty directory": (["convert", str(tmp / "empty"), "-o", out], ("no recording files",)),
        "output exists": (["convert", str(good), "-o", str(tmp / "exists.zarr")],
                          ("already exists", "--overwrite")),
        "no parent folder": (["convert", str(good), "-o", str(tmp / "no" / "such" / "o.zarr")],
                             ("does not exist",)),
        "bad chunks": (["convert", str(good), "-o", out, "--chunks", "0,16,16"], ("chunk",)),
        "bad clevel": (["convert", str(good), "-o", out, "--clevel", "12"], ("clevel",)),
        "bad frame rate": (["convert", str(good), "-o", out, "--frame-rate", "-3"],
                           ("frame_rate",)),
        "unknown cluster": (["convert", str(good), "-o", out, "--cluster", "moon"],
                            ("unknown cluster",)),
        "info of nothing": (["info", str(tmp / "nothing.zarr")], ("does not exist",)),
        "info of a broken tiff": (["info", str(tmp / "notes.tif")], ("not a readable TIFF",)),
        "info of a text file": (["info", str(tmp / "notes.csv")], ("unknown format",)),
        "export of nothing": (["export", str(tmp / "nothing.zarr"), "-o", str(tmp / "x.tif")],
                              ("does not exist",)),
    }


@pytest.mark.parametrize("case", [
    "missing source", "not a tiff", "truncated", "frame shapes differ", "dtypes differ",
    "empty directory", "output exists", "no parent folder", "bad chunks", "bad clevel",
    "bad frame rate", "unknown cluster", "info of nothing", "info of a broken tiff",
    "info of a text file", "export of nothing",
])
def test_bad_input_gives_one_clean_line(tmp_path: Path, case: str) -> None:
    args, needles = _bad_inputs(tmp_path)[case]
    result = run_cli(*args, timeout=120)
    assert_clean_error(result, *needles)
    assert not (tmp_path / "out.zarr").exists()
    assert (tmp_path / "exists.zarr" / "zarr.json").read_text() == "{}"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("--debug", "convert", str(tmp_path / "nope.tif"), "-o",
                     str(tmp_path / "o.zarr"))
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_unwritable_output(tmp_path: Path, readonly_dir: Path) -> None:
    src = write_plain(tmp_path / "a.tif", movie((6, 8, 8), "uint16"))
    result = run_cli("convert", str(src), "-o", str(readonly_dir / "o.zarr"))
    assert_clean_error(result, "cannot write")
    result = run_cli("export", str(tmp_path / "nothing.zarr"), "-o", str(readonly_dir / "o.tif"))
    assert_clean_error(result)


def test_unreachable_scheduler_fails_fast(tmp_path: Path) -> None:
    src = write_plain(tmp_path / "a.tif", movie((6, 8, 8), "uint16"))
    result = run_cli("convert", str(src), "-o", str(tmp_path / "o.zarr"), "--cluster",
                     "tcp://127.0.0.1:9", timeout=60)
    assert_clean_error(result, "cannot reach")


@pytest.mark.parametrize(("given", "expected"), [((), "default"), (("--bypass", "none"), None),
                                                 (("--bypass", "5,3,3"), (5, 3, 3))])
def test_bypass_option_of_run_and_demo(given: tuple[str, ...], expected: object) -> None:
    """``run`` and ``demo`` turn ``--bypass`` into the training config as ``train`` does, the
    demo's other training settings kept."""
    from deepcad_chunked.cli.main import build_parser
    from deepcad_chunked.cli.options import training_config

    from deepcad_chunked.config import BYPASS_KERNEL, TrainConfig
    from deepcad_chunked.jobs.run import DEMO_TRAINING

    parser = build_parser()
    run = training_config(parser.parse_args(["run", "a.tif", "-o", "o", *given]))
    demo = training_config(parser.parse_args(["demo", "-o", "o", *given]), DEMO_TRAINING)
    train = training_config(parser.parse_args(["train", "a.zarr", "-o", "r", *given]))
    want = BYPASS_KERNEL if expected == "default" else expected
    assert run.bypass == demo.bypass == train.bypass == want
    assert run.features == TrainConfig().features
    assert (demo.features, demo.loss, demo.average) == (DEMO_TRAINING.features, "l2", 0.99)


def test_run_demo_and_train_share_every_training_option() -> None:
    """The same training options in the three commands, each reaching the config."""
    from deepcad_chunked.cli.main import build_parser
    from deepcad_chunked.cli.options import training_config

    given = ["--epochs", "3", "--steps-per-epoch", "7", "--patch", "8,16,16", "--batch-size",
             "3", "--features", "4", "--lr", "0.002", "--schedule", "cosine", "--warmup", "0.1",
             "--loss", "l1+l2", "--average", "0.9", "--no-calibrate", "--seed", "5",
             "--device", "cpu", "--val-fraction", "0.2"]
    parser = build_parser()
    configs = [training_config(parser.parse_args(["run", "a.tif", "-o", "o", *given,
                                                  "--loader-workers", "1"])),
               training_config(parser.parse_args(["demo", "-o", "o", *given,
                                                  "--loader-workers", "1"])),
               training_config(parser.parse_args(["train", "a.zarr", "-o", "r", *given,
                                                  "--workers", "1"]))]
    for config in configs:
        assert (config.epochs, config.steps_per_epoch, config.patch, config.batch_size,
                config.features, config.lr, config.schedule, config.warmup, config.loss,
                config.average, config.calibrate, config.seed, config.device,
                config.val_fraction, config.workers) == (
            3, 7, (8, 16, 16), 3, 4, 0.002, "cosine", 0.1, "l1+l2", 0.9, False, 5, "cpu", 0.2, 1)
