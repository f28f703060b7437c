"""The Follow widget: denoise an acquisition while the microscope writes it, showing the
newest raw and denoised frames as they are stored, the counts and the lag; Stop ends it
cleanly (following the same folder again resumes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QLabel, QLineEdit, QWidget

from deepcad_chunked.store.integrity import open_array
from deepcad_chunked.store.omezarr import ARRAY_PATH
from deepcad_chunked.viewer.job_panel import JobPanel
from deepcad_chunked.viewer.layers import META

#: Names of the two live layers.
LIVE = ("follow raw", "follow denoised")


class _Relay(QObject):
    """Carries the newest frames and the counts from the job's thread to the widget's."""

    frames = Signal(int, object, object)
    status = Signal(int, int, float)


class FollowWidget(JobPanel):
    """napari dock widget: follow an acquisition (see the module's description)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, "Start", "Stop",
                         "stopped: what was stored is kept; Start resumes", parent)
        self.result: Any = None
        self.shown = 0  # the newest frame on screen
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("folder the microscope writes TIFF files into")
        self.model = QLineEdit()
        self.model.setPlaceholderText("checkpoint or DeepCAD-RT .pth")
        self.output = QLineEdit()
        self.output.setPlaceholderText("output folder")
        self.cluster = QLineEdit("local")
        for label, field in (("acquisition", self.folder), ("model", self.model),
                             ("output", self.output), ("cluster", self.cluster)):
            self.form.addRow(label, field)
        self.counts = QLabel("")
        self.below.addWidget(self.counts)
        self.relay = _Relay()
        self.relay.frames.connect(self._show)
        self.relay.status.connect(self._count)
        #: the FollowConfig of the runs (None: the defaults), for callers that need others
        self.follow_config: Any = None

    def start(self) -> None:
        """Start following in a background thread."""
        folder, model, output = (w.text().strip() for w in (self.folder, self.model,
                                                              self.output))
        if not folder or not model or not output:
            self.say("error: choose the acquisition folder, a model and an output folder")
            return
        self.shown = 0
        self.say("following…")
        self.run_in_background(_job, folder, model, output, self.follow_config,
                               self.cluster.text().strip() or "local", self.relay,
                               done=self._finished)

    def _show(self, frame: int, raw: np.ndarray, denoised: np.ndarray) -> None:
        if frame < self.shown:
            return
        self.shown = frame
        for name, data in zip(LIVE, (raw, denoised), strict=True):
            if name in self.viewer.layers:
                self.viewer.layers[name].data = data
            else:
                lay = self.viewer.add_image(data, name=name, metadata={
                    META: {"pair": "follow", "role": name.split()[-1], "store": ""}})
                if name == LIVE[1]:  # the denoised frame shown with the raw one's contrast
                    lay.contrast_limits = self.viewer.layers[LIVE[0]].contrast_limits
        self.viewer.text_overlay.visible = True
        self.viewer.text_overlay.text = f"frame {frame}"

    def _count(self, acquired: int, denoised: int, lag_s: float) -> None:
        self.counts.setText(f"acquired {acquired} frames, denoised {denoised}: lag "
                            f"{acquired - denoised} frames, {lag_s:.1f} s")

    def _finished(self, outcome: Any) -> None:
        self.result = outcome
        self.say(f"done: {outcome.frames} frames in {outcome.denoised.path}")


def _job(folder: str, model: str, output: str, config: Any, cluster: str,
         relay: _Relay) -> Any:
    """The background thread's work: follow, sending each stored block's last frame."""
    from deepcad_chunked.jobs.follow import follow

    out = Path(output).expanduser().absolute()

    def on_block(start: int, stop: int, stored: float) -> None:
        raw = open_array(f"{out / 'recording.zarr'}/{ARRAY_PATH}", strict=False)
        den = open_array(f"{out / 'denoised.zarr'}/{ARRAY_PATH}", strict=False)
        relay.frames.emit(stop - 1, np.asarray(raw[stop - 1]), np.asarray(den[stop - 1]))

    return follow(folder, model, out, config=config, cluster=cluster, on_block=on_block,
                  on_status=relay.status.emit)
