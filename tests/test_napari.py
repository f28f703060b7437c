"""The napari plugin, headless (Qt offscreen): the reader is lazy and shows stores as they
are, a run's two stores are linked, the Denoise widget gives the command line's result
(and resumes after a cancel), the Follow widget follows a simulated acquisition, the Compare
widget plots the traces of a region."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

from deepcad_chunked import ConvertConfig, convert, denoise
from deepcad_chunked.store.recording import open_recording
from deepcad_chunked.viewer.compare_widget import CompareWidget, delta_f
from deepcad_chunked.viewer.denoise_widget import DenoiseWidget
from deepcad_chunked.viewer.follow_widget import LIVE, FollowWidget
from deepcad_chunked.viewer.layers import META
from tests.conftest import S3, run_cli
from tests.test_foreign import _ome_zarr_py
from tests.test_train import blinking_cells
from tests.tiffs import write_plain

PLUGIN = "deepcad-chunked"
#: Where the tests leave the viewer's screenshots (CI keeps them as artefacts).
ARTEFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

_opened: list[str] = []
_watching: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _watching and isinstance(args[0], (str, Path)):
        path = str(args[0])
        if path.startswith(_watching[0]):
            _opened.append(path)


sys.addaudithook(_audit)


def _chunk_frames(store: Path, opened: list[str]) -> set[int]:
    """The frame chunks (first chunk index) of the chunk files opened in ``store``."""
    found = set()
    for path in opened:
        parts = Path(path).relative_to(store).parts
        if "c" in parts and parts[-1] != "zarr.json":
            found.add(int(parts[parts.index("c") + 1]))
    return found


@pytest.fixture(scope="module", autouse=True)
def screen() -> None:
    """An X server for OpenGL (Mesa), which Qt's offscreen platform draws napari's canvas
    with: the session's own, or a virtual one (Debian's Xvfb). Qt keeps its connection until
    the process ends (a server gone before would end the process), so a watcher stops the
    server once the tests' process has ended."""
    if os.environ.get("DISPLAY"):
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("napari's canvas needs OpenGL through an X server: install Xvfb "
                    "(apt-get install xvfb), as .ci/run does")
    number = next(n for n in range(90, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists()
                  and not Path(f"/tmp/.X{n}-lock").exists())
    server = subprocess.Popen([xvfb, f":{number}", "-screen", "0", "1280x1024x24",
                               "-nolisten", "tcp"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("Xvfb did not start")
        time.sleep(0.05)
    subprocess.Popen(["sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; "
                      f"done; kill {server.pid}"], start_new_session=True)
    os.environ["DISPLAY"] = f":{number}"


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    """64 frames of 32×32 blinking cells in chunks of 8 frames (no shards), at 0.5 µm, 20 Hz."""
    folder = tmp_path_factory.mktemp("napari")
    tif = write_plain(folder / "cells.tif", blinking_cells(64, 32))
    convert(tif, folder / "cells.zarr", config=ConvertConfig(
        chunks=(8, 16, 16), shards="none", pixel_size=0.5, frame_rate=20.0),
        cluster=client, progress=False)
    return folder / "cells.zarr"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory, cells: Path, tiny_model: Path,
               client: Client) -> Path:
    """A folder as ``run`` leaves it: the recording and its denoised store."""
    folder = tmp_path_factory.mktemp("run")
    import shutil

    shutil.copytree(cells, folder / "recording.zarr")
    denoise(folder / "recording.zarr", tiny_model, folder / "denoised.zarr", cluster=client,
            progress=False)
    return folder


def _screenshot(viewer: Any, name: str) -> np.ndarray:
    ARTEFACTS.mkdir(exist_ok=True)
    return np.asarray(viewer.screenshot(path=str(ARTEFACTS / name), canvas_only=False))


def test_a_store_opens_lazily_with_its_scales_and_stored_contrast(make_napari_viewer: Any,
                                                                  cells: Path) -> None:
    viewer = make_napari_viewer()
    rec = open_recording(cells)
    _opened.clear()
    _watching[:] = [str(cells)]
    try:
        layers = viewer.open(str(cells), plugin=PLUGIN)
        shown = np.asarray(viewer.screenshot(canvas_only=True))
        first = set(_chunk_frames(cells, _opened))
        on_screen = int(viewer.dims.current_step[0])
        viewer.dims.set_current_step(0, 60)
        np.asarray(viewer.screenshot(canvas_only=True))
        later = _chunk_frames(cells, _opened) - first
    finally:
        _watching.clear()
    assert len(layers) == 1
    lay = layers[0]
    assert not isinstance(lay.data, np.ndarray)  # the store's array: nothing loaded whole
    # only the chunks of the frame on screen were read (and of frame 0, which napari slices
    # as it makes a layer, before the viewer moves to the middle frame): 2 of 8
    assert first == {0, on_screen // 8}, (first, on_screen)
    assert later == {7}, later  # …and the chunks of frame 60 once it is shown
    np.testing.assert_allclose(lay.scale, [0.05, 0.5, 0.5])
    pct = rec.statistics["percentiles"]
    assert tuple(lay.contrast_limits) == (pct["p0.1"], pct["p99.9"])
    assert np.array_equal(np.asarray(lay.data[60]), rec.array[60])
    assert shown.std() > 0  # something was drawn


def test_a_run_folder_shows_the_recording_and_its_denoised_store_linked(
        make_napari_viewer: Any, run_folder: Path, qtbot: Any) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open(str(run_folder), plugin=PLUGIN)
    raw, den = (viewer.layers[name] for name in ("raw", "denoised"))
    assert len(layers) == 2
    assert tuple(raw.contrast_limits) == tuple(den.contrast_limits)
    assert list(raw.scale) == list(den.scale)
    qtbot.waitUntil(lambda: len(__import__(
        "napari.layers.utils._link_layers", fromlist=["x"]).get_linked_layers(raw)) == 1)
    raw.contrast_limits = (100.0, 120.0)
    assert tuple(den.contrast_limits) == (100.0, 120.0)  # one setting moves both
    # opened on its own, a denoised store is shown like the recording it was made from
    alone = make_napari_viewer().open(str(run_folder / "denoised.zarr"), plugin=PLUGIN)[0]
    assert tuple(alone.contrast_limits) == tuple(
        open_recording(run_folder / "recording.zarr").statistics["percentiles"][k]
        for k in ("p0.1", "p99.9"))


def test_a_foreign_ome_zarr_and_an_s3_store_open(make_napari_viewer: Any, tmp_path: Path,
                                                 s3: S3) -> None:
    data = blinking_cells(16, 32)
    foreign = _ome_zarr_py(tmp_path / "foreign.zarr", data, "0.5")
    viewer = make_napari_viewer()
    lay = viewer.open(str(foreign), plugin=PLUGIN)[0]
    assert np.array_equal(np.asarray(lay.data[5]), data[5])
    assert lay.contrast_limits[1] > lay.contrast_limits[0]
    url = f"s3://{s3.bucket}/cells.zarr"
    # a cluster of its own: its workers start with the S3 server's credentials
    convert(write_plain(tmp_path / "c.tif", blinking_cells(32, 32)), url, cluster="local",
            workers=1, progress=False)
    remote = viewer.open(url, plugin=PLUGIN)[0]
    assert np.array_equal(np.asarray(remote.data[3]), open_recording(url).array[3])
    assert remote.metadata[META]["store"].startswith("s3://")


TINY = {"patch": (8, 16, 16), "features": 4, "batch_size": 2, "workers": 0,
        "device": "cpu"}


def test_the_denoise_widget_resumes_after_a_cancel_and_gives_the_command_lines_result(
        make_napari_viewer: Any, qtbot: Any, tmp_path: Path) -> None:
    tif = write_plain(tmp_path / "rec.tif", blinking_cells(64, 32))
    viewer = make_napari_viewer()
    widget = DenoiseWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.source.setText(str(tmp_path / "missing.tif"))  # a mistake: one line, nothing made
    widget.output.setText(str(tmp_path / "out"))
    widget.start_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    said = widget.status.text()
    assert said.startswith("error: ") and "missing.tif" in said and "\n" not in said, said
    assert "Traceback" not in said and widget.start_button.isEnabled()
    widget.source.setText(str(tif))
    widget.output.setText(str(tmp_path / "out"))
    widget.epochs.setValue(3)
    widget.train_options = {**TINY, "steps_per_epoch": 40}
    widget.start_button.click()
    qtbot.waitUntil(lambda: widget.bars["train"].value() > 50, timeout=120_000)
    widget.stop_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith("cancelled"), widget.status.text()
    assert not (tmp_path / "out" / "denoised.zarr").exists()
    assert (tmp_path / "out" / "model" / "epoch_0001.pt").exists()

    widget.start_button.click()  # again: resumes the training where it stopped
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    assert widget.status.text().startswith("done"), widget.status.text()
    assert all(bar.value() == bar.maximum() for bar in widget.bars.values())
    assert "held-out score" in widget.score.text() and "Gaussian" in widget.score.text()
    added = viewer.layers[-1]
    assert added.metadata[META]["role"] == "denoised"

    cli = run_cli("run", str(tif), "-o", str(tmp_path / "cli"), "--patch", "8,16,16",
                  "--features", "4", "--batch-size", "2", "--loader-workers", "0", "--device",
                  "cpu", "--steps-per-epoch", "40", "--epochs", "3", "--no-progress")
    assert cli.returncode == 0, cli.stderr
    want = open_recording(tmp_path / "cli" / "denoised.zarr").array[:]
    got = np.asarray(added.data)
    assert np.abs(got.astype(np.float64) - want).max() <= 1.0, "widget and CLI differ"
    viewer.add_image(open_recording(tmp_path / "out" / "recording.zarr").array[:], name="raw",
                     visible=False)
    shot = _screenshot(viewer, "napari-denoise.png")
    assert shot.std() > 5 and shot.shape[0] > 200


def test_the_follow_widget_follows_a_simulated_acquisition_and_stops(
        make_napari_viewer: Any, qtbot: Any, tmp_path: Path, tiny_model: Path) -> None:
    acquisition = tmp_path / "acq"
    writer = subprocess.Popen([sys.executable, "-m", "deepcad_chunked", "simulate",
                               "--acquire", str(acquisition), "--rate", "20", "--frames", "240",
                               "--size", "32,32", "--stop"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    qtbot.waitUntil(acquisition.exists, timeout=30_000)
    viewer = make_napari_viewer()
    widget = FollowWidget(viewer)
    widget.folder.setText(str(acquisition))
    widget.model.setText(str(tiny_model))
    widget.output.setText(str(tmp_path / "out"))
    widget.start_button.click()
    qtbot.waitUntil(lambda: LIVE[1] in viewer.layers, timeout=120_000)
    widget.stop_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith("stopped"), widget.status.text()
    first = widget.shown

    widget.start_button.click()  # resumes, and follows to the end of the acquisition
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    writer.communicate(timeout=60)
    assert widget.status.text().startswith("done: 240 frames"), widget.status.text()
    assert widget.shown == 239 > first
    assert "acquired 240 frames, denoised 240" in widget.counts.text(), widget.counts.text()
    den = open_recording(tmp_path / "out" / "denoised.zarr").array
    assert np.array_equal(np.asarray(viewer.layers[LIVE[1]].data), den[239])


def test_the_compare_widget_plots_the_traces_of_a_disc_and_of_a_shape(
        make_napari_viewer: Any, run_folder: Path) -> None:
    viewer = make_napari_viewer()
    viewer.open(str(run_folder), plugin=PLUGIN)
    widget = CompareWidget(viewer)
    assert widget.raw.currentText() == "raw" and widget.denoised.currentText() == "denoised"
    widget.radius.setValue(3)
    traces = widget.show_disc(12.0, 20.0)
    raw = open_recording(run_folder / "recording.zarr").array[:].astype(np.float64)
    yy, xx = np.ogrid[:32, :32]
    inside = (yy - 12) ** 2 + (xx - 20) ** 2 <= 9
    np.testing.assert_allclose(traces["raw"], raw[:, inside].mean(axis=1))
    assert set(traces) == {"raw", "denoised"} and len(traces["denoised"]) == 64
    assert len(widget.axes.lines) == 2
    np.testing.assert_allclose(widget.axes.lines[0].get_ydata(), delta_f(traces["raw"]))
    shapes = viewer.add_shapes([[[4, 4], [4, 11], [11, 11], [11, 4]]], shape_type="polygon",
                               scale=viewer.layers["raw"].scale[-2:])
    shapes.add_rectangles([[0, 0], [7, 7]])  # a shape added: its trace is plotted
    box = raw[:, 0:8, 0:8].mean(axis=(1, 2))
    np.testing.assert_allclose(widget.traces["raw"], box)
