"""Training on tiny recordings: it learns, it is reproducible, it resumes, it refuses bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client

from deepcad_chunked import ConvertConfig, TrainConfig, convert, train
from deepcad_chunked.errors import ConfigError, DeepCADError, IncompleteStoreError
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.store.omezarr import update_attrs
from deepcad_chunked.training.dataset import Normalization, TilePairDataset, make_pairs
from deepcad_chunked.training.loop import lr_factor
from deepcad_chunked.training.tiles import draw, make_pair, split_regions
from tests.conftest import assert_clean_error, run_cli
from tests.tiffs import write_plain

TINY = {"patch": (8, 16, 16), "features": 4, "batch_size": 4, "lr": 1e-3, "workers": 0,
        "device": "cpu"}


def blinking_cells(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth blobs whose brightness drifts, under strong Poisson noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    clean = np.full((frames, size, size), 5.0)
    t = np.arange(frames)
    for _ in range(6):
        cy, cx = rng.uniform(0, size, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
        clean += (20 + 15 * np.sin(t / rng.uniform(5, 15)))[:, None, None] * blob
    return rng.poisson(clean).astype(np.uint16)


def cells_store(folder: Path, client: Client) -> Path:
    """A store of 160 frames of :func:`blinking_cells`, 32×32, in chunks of 16³."""
    tif = write_plain(folder / "cells.tif", blinking_cells(160, 32))
    convert(tif, folder / "cells.zarr", config=ConvertConfig(chunks=(16, 16, 16)), cluster=client,
            progress=False)
    return folder / "cells.zarr"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    return cells_store(tmp_path_factory.mktemp("train"), client)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return Checkpoint.load(path).model_state


def test_training_lowers_the_loss_and_writes_checkpoints_and_logs(tmp_path: Path,
                                                                  store: Path) -> None:
    # from random weights (no bypass, which would start as a Gaussian filter with a loss
    # already near its floor), so the fall of the loss is large and sure
    result = train(store, tmp_path / "run", config=TrainConfig(**TINY, epochs=4,
                                                               steps_per_epoch=15, bypass=None),
                   progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt",
                     "epoch_0004.pt", "last.pt", "log.csv", "log.json"]
    best_epoch = min(result.history, key=lambda h: h["val_loss"])["epoch"]
    assert Checkpoint.load(result.best).epoch == best_epoch
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "log.json").read_text())[3]["val_loss"] == \
        pytest.approx(result.history[3]["val_loss"])
    ckpt = Checkpoint.load(result.last)
    assert ckpt.config["patch"] == [8, 16, 16] and ckpt.step == 60
    assert ckpt.optimizer_state["state"]  # Adam moments are saved for resuming
    assert ckpt.normalization["mean"] == pytest.approx(
        float(blinking_cells(160, 32).mean()), rel=1e-9)


def test_loader_workers_do_not_change_the_result(tmp_path: Path, store: Path) -> None:
    config = {**TINY, "epochs": 1, "steps_per_epoch": 6}
    a = train(store, tmp_path / "w0", config=TrainConfig(**config), progress=False)
    b = train(store, tmp_path / "w2", config=TrainConfig(**{**config, "workers": 2}),
              progress=False)
    for name, tensor in _weights(a.last).items():
        assert torch.equal(tensor, _weights(b.last)[name]), name


def test_dataset_ships_only_paths_to_workers(store: Path) -> None:
    regions, _ = split_regions([(160, 32, 32)], (16, 16, 16), 0.1)
    ds = TilePairDataset([str(store / "0")], regions, (16, 16, 16), 0, Normalization(0.0, 1.0))
    ds[0]  # opens the store in this process
    assert ds._arrays
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    assert not pickle.loads(blob)._arrays
    pair = ds[5]
    assert pair.shape == (2, 8, 16, 16) and pair.dtype == torch.uint16  # raw: half the bytes
    inp, tgt = make_pairs(pair[None], ds.normalization)
    want_inp, want_tgt = ds.pair(draw(0, 5, regions, (16, 16, 16)))
    torch.testing.assert_close(inp[0], want_inp)
    torch.testing.assert_close(tgt[0], want_tgt)


def test_windows_are_read_once_and_cover_the_recording(store: Path) -> None:
    regions, _ = split_regions([(160, 32, 32)], (16, 16, 16), 0.1)
    ds = TilePairDataset([str(store / "0")], regions, (16, 16, 16), 3, Normalization(0.0, 1.0),
                         tiles_per_window=8, chunks=[(16, 16, 16)])
    plain = TilePairDataset([str(store / "0")], regions, (16, 16, 16), 3, Normalization(0.0, 1.0))
    starts = set()
    for i in range(400):
        pair = ds[i]
        assert len(ds._windows) <= 2
        d = draw(3, i, regions, (16, 16, 16), window=ds._window(i // 8)[0])
        starts.add(d.t0)
        raw = plain.read(d)
        first, second = make_pair(raw, d.swap, d.transform)
        assert torch.equal(pair, torch.from_numpy(np.stack([first, second])))
    assert min(starts) == 0 and max(starts) == 144 - 16


def _train_args(store: Path, run: Path) -> list[str]:
    return ["train", str(store), "-o", str(run), "--patch", "8,16,16", "--features", "4",
            "--batch-size", "4", "--lr", "1e-3", "--epochs", "4", "--steps-per-epoch", "40",
            "--workers", "0", "--device", "cpu", "--no-progress"]


def test_sigkill_and_resume_give_bit_identical_weights(tmp_path: Path, store: Path) -> None:
    reference = tmp_path / "reference"
    assert run_cli(*_train_args(store, reference)).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "deepcad_chunked.cli.main",
                             *_train_args(store, run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (run / "epoch_0001.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "epoch_0004.pt").exists()

    result = run_cli(*_train_args(store, run), "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    want, got = _weights(reference / "last.pt"), _weights(run / "last.pt")
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert Checkpoint.load(run / "last.pt").epoch == 4


def test_a_kill_between_the_epoch_file_and_last_pt_resumes_from_the_epoch(
        tmp_path: Path, store: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = {**TINY, "steps_per_epoch": 2}
    full = train(store, tmp_path / "full", config=TrainConfig(**config, epochs=3),
                 progress=False)
    run = tmp_path / "cut"
    train(store, run, config=TrainConfig(**config, epochs=2), progress=False)
    epoch_two = (run / "epoch_0002.pt").read_bytes()
    (run / "last.pt").write_bytes((run / "epoch_0001.pt").read_bytes())  # one epoch behind
    (run / "best.pt").unlink()
    with caplog.at_level(logging.INFO, logger="deepcad_chunked"):
        train(store, run, config=TrainConfig(**config, epochs=3), resume=True, progress=False)
    assert "after epoch 2" in caplog.text
    assert (run / "best.pt").exists()
    assert (run / "epoch_0002.pt").read_bytes() == epoch_two
    want, got = _weights(full.last), _weights(run / "last.pt")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_resume_with_other_options_is_refused(tmp_path: Path, store: Path) -> None:
    train(store, tmp_path / "run", config=TrainConfig(**TINY, epochs=1, steps_per_epoch=2),
          progress=False)
    with pytest.raises(DeepCADError, match="features"):
        train(store, tmp_path / "run", config=TrainConfig(**{**TINY, "features": 8}, epochs=2,
                                                           steps_per_epoch=2), resume=True)
    with pytest.raises(DeepCADError, match="--resume"):
        train(store, tmp_path / "run", config=TrainConfig(**TINY, epochs=1, steps_per_epoch=2))


def test_recording_smaller_than_a_tile_names_sizes_that_work(tmp_path: Path,
                                                             store: Path) -> None:
    with pytest.raises(ConfigError, match=r"160 frames of 32×32.*--patch 80,32,32"):
        train(store, tmp_path / "r", config=TrainConfig(**{**TINY, "patch": (96, 16, 16)}))
    assert not (tmp_path / "r").exists()


def test_patch_off_the_grid_is_refused() -> None:
    with pytest.raises(ConfigError, match="multiples of 8"):
        TrainConfig.build(patch=(8, 12, 16))


def test_incomplete_store_is_refused(tmp_path: Path, store: Path) -> None:
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    update_attrs(copy, complete=False)
    with pytest.raises(IncompleteStoreError):
        train(copy, tmp_path / "run", config=TrainConfig(**TINY))


def test_cli_errors(tmp_path: Path, store: Path, readonly_dir: Path) -> None:
    assert_clean_error(run_cli("train", str(store), "-o", str(readonly_dir / "run"),
                               "--patch", "8,16,16"), "cannot write", "read-only")
    assert_clean_error(run_cli("train", str(store), "-o", str(tmp_path / "r"), "--patch",
                               "8,12,16"), "multiples of 8")
    assert_clean_error(run_cli("train", str(tmp_path / "none.zarr"), "-o", str(tmp_path / "r")),
                       "does not exist")
    assert_clean_error(run_cli("train", str(store), "-o", str(tmp_path / "r"), "--lr", "-1"),
                       "lr")


def test_learning_rate_schedules() -> None:
    assert [lr_factor(s, 100, "constant", 0.1) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    warm = [lr_factor(s, 100, "cosine", 0.1) for s in range(10)]
    assert warm == sorted(warm) and warm[0] == pytest.approx(1 / 11) and warm[-1] < 1
    assert lr_factor(10, 100, "cosine", 0.1) == 1.0  # the peak, right after the warm-up
    decay = [lr_factor(s, 100, "cosine", 0.1) for s in range(10, 100)]
    assert decay == sorted(decay, reverse=True) and decay[-1] < 0.01
    assert lr_factor(55, 100, "cosine", 0.1) == pytest.approx(0.5)  # half way down
    assert lr_factor(0, 100, "cosine", 0.0) == 1.0


def test_the_schedule_and_the_loss_are_applied(tmp_path: Path, store: Path) -> None:
    config = TrainConfig(**TINY, epochs=2, steps_per_epoch=3, schedule="cosine", warmup=0.2,
                         loss="l2")
    result = train(store, tmp_path / "run", config=config, progress=False)
    ckpt = Checkpoint.load(result.last)
    lr = ckpt.optimizer_state["param_groups"][0]["lr"]
    assert lr == pytest.approx(config.lr * lr_factor(5, 6, "cosine", 0.2))
    assert ckpt.config["loss"] == "l2" and ckpt.config["schedule"] == "cosine"
    plain = train(store, tmp_path / "plain", config=TrainConfig(**TINY, epochs=2,
                                                                steps_per_epoch=3),
                  progress=False)
    assert Checkpoint.load(plain.last).optimizer_state["param_groups"][0]["lr"] == TINY["lr"]
    assert plain.history[-1]["val_loss"] != result.history[-1]["val_loss"]


def test_checkpoints_from_before_the_training_options_resume(
        tmp_path: Path, store: Path) -> None:
    """A run directory written before ``schedule``, ``warmup``, ``loss``, ``average`` and
    ``bypass`` existed resumes with their old meaning (constant, DeepCAD's L1+L2, no average,
    DeepCAD-RT's network), and refuses another loss or a bypass its weights do not have."""
    old = {**TINY, "steps_per_epoch": 2, "schedule": "constant", "loss": "l1+l2",
           "bypass": None}
    run = tmp_path / "run"
    train(store, run, config=TrainConfig(**old, epochs=1), progress=False)
    for name in ("epoch_0001.pt", "last.pt", "best.pt"):
        ckpt = Checkpoint.load(run / name)
        for key in ("schedule", "warmup", "loss", "average", "bypass"):
            ckpt.config.pop(key)
        ckpt.save(run / name)
    with pytest.raises(DeepCADError, match="loss"):
        train(store, run, config=TrainConfig(**{**old, "loss": "l2"}, epochs=2), resume=True,
              progress=False)
    with pytest.raises(DeepCADError, match="bypass none"):  # today's default has one
        train(store, run, config=TrainConfig(**{**old, "bypass": (13, 7, 7)}, epochs=2),
              resume=True, progress=False)
    result = train(store, run, config=TrainConfig(**old, epochs=2), resume=True,
                   progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_the_bypass_is_trained_and_can_be_left_out(tmp_path: Path, store: Path) -> None:
    """By default the network has a linear bypass, which starts as a Gaussian and is learned;
    ``--bypass none`` trains DeepCAD-RT's network as published, ``--bypass 5,3,3`` another
    kernel, and even or oversized kernels are one-line errors."""
    from deepcad_chunked.config import BYPASS_KERNEL
    from deepcad_chunked.model.unet3d import BYPASS_SIGMA, gaussian_kernel

    with_bypass = Checkpoint.load(train(store, tmp_path / "b", config=TrainConfig(
        **TINY, epochs=1, steps_per_epoch=4), progress=False).last)
    weight = with_bypass.model_state["bypass.weight"][0, 0]
    assert tuple(weight.shape) == BYPASS_KERNEL == TrainConfig().bypass
    start = gaussian_kernel(BYPASS_KERNEL, BYPASS_SIGMA)
    assert 0 < float((weight - start).abs().max()) < 0.1  # learned, from the Gaussian
    assert float(with_bypass.model_state["final.weight"].abs().max()) > 0  # the U-Net learns
    assert run_cli("train", str(store), "-o", str(tmp_path / "n"), "--patch", "8,16,16",
                   "--features", "4", "--epochs", "1", "--steps-per-epoch", "2",
                   "--workers", "0", "--device", "cpu", "--bypass", "none").returncode == 0
    assert not any(k.startswith("bypass") for k in
                   Checkpoint.load(tmp_path / "n" / "last.pt").model_state)
    assert run_cli("train", str(store), "-o", str(tmp_path / "k"), "--patch", "8,16,16",
                   "--features", "4", "--epochs", "1", "--steps-per-epoch", "2",
                   "--workers", "0", "--device", "cpu", "--bypass", "5,3,3").returncode == 0
    assert tuple(Checkpoint.load(tmp_path / "k" / "last.pt").model_state["bypass.weight"]
                 .shape[2:]) == (5, 3, 3)
    for bad in ("4,3,3", "33,7,7"):
        assert_clean_error(run_cli("train", str(store), "-o", str(tmp_path / "x"),
                                   "--bypass", bad), "bypass kernel sizes must be odd")


def test_weight_averaging_is_saved_for_inference_and_resumes_exactly(
        tmp_path: Path, store: Path) -> None:
    """With ``average``, checkpoints hold the moving average (what inference loads) and the
    optimiser's own weights beside it; a run resumed after epoch 1 ends where an
    uninterrupted one does."""
    config = {**TINY, "steps_per_epoch": 3, "average": 0.9}
    full = train(store, tmp_path / "full", config=TrainConfig(**config, epochs=2),
                 progress=False)
    ckpt = Checkpoint.load(full.last)
    assert set(ckpt.live_state) == set(ckpt.model_state)
    assert any(not torch.equal(ckpt.live_state[k], ckpt.model_state[k])
               for k in ckpt.model_state)
    run = tmp_path / "cut"
    train(store, run, config=TrainConfig(**config, epochs=2), progress=False)
    for name in ("epoch_0002.pt", "last.pt", "best.pt"):
        (run / name).unlink(missing_ok=True)
    (run / "last.pt").write_bytes((run / "epoch_0001.pt").read_bytes())
    train(store, run, config=TrainConfig(**config, epochs=2), resume=True, progress=False)
    resumed = Checkpoint.load(run / "last.pt")
    for state in ("model_state", "live_state"):
        want, got = getattr(ckpt, state), getattr(resumed, state)
        assert all(torch.equal(want[k], got[k]) for k in want)
    plain = Checkpoint.load(train(store, tmp_path / "plain", config=TrainConfig(
        **{**config, "average": 0.0}, epochs=2), progress=False).last)
    assert plain.live_state == {}
    assert all(torch.equal(plain.model_state[k], ckpt.live_state[k]) for k in plain.model_state)


def test_checkpoints_carry_the_intensity_calibration_which_leaves_training_alone(
        tmp_path: Path, store: Path) -> None:
    """Every checkpoint holds a calibration fitted on held-out frames; fitting it changes
    nothing of the training (the same weights without it), and --no-calibrate leaves it out."""
    from deepcad_chunked.model.calibration import output_calibration

    config = TrainConfig(**TINY, epochs=2, steps_per_epoch=3)
    with_it = train(store, tmp_path / "c", config=config, progress=False)
    for name in ("epoch_0001.pt", "epoch_0002.pt", "best.pt", "last.pt"):
        calibration = output_calibration(Checkpoint.load(tmp_path / "c" / name).normalization)
        assert calibration is not None and np.all(np.isfinite(calibration.shift))
    off = train(store, tmp_path / "n", config=config.model_copy(update={"calibrate": False}),
                progress=False)
    without = Checkpoint.load(off.last)
    assert "calibration" not in without.normalization
    for key, value in _weights(with_it.last).items():
        assert torch.equal(value, without.model_state[key]), key
    assert run_cli("train", str(store), "-o", str(tmp_path / "cli"), "--patch", "8,16,16",
                   "--features", "4", "--epochs", "1", "--steps-per-epoch", "1", "--workers",
                   "0", "--device", "cpu", "--no-calibrate").returncode == 0
    assert "calibration" not in Checkpoint.load(tmp_path / "cli" / "last.pt").normalization
