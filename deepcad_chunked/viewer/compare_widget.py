"""The Compare widget: click a cell (or draw a shape) and see its raw and denoised traces.

The trace of a region is its mean over the pixels of a disc around the click (or inside the
newest shape of a Shapes layer), frame by frame, read lazily from the two layers' stores:
only the chunks that hold the region, over at most :data:`WINDOW` frames around the one on
screen. ΔF/F is the trace over its 10th percentile, minus one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QSpinBox, QVBoxLayout, QWidget

from deepcad_chunked.viewer.layers import META

log = logging.getLogger(__name__)

#: Most frames a trace spans (centred on the frame on screen).
WINDOW = 3000
#: Percentile taken as F0 for ΔF/F.
BASELINE = 10.0


def region_trace(data: Any, mask: np.ndarray, frames: tuple[int, int]) -> np.ndarray:
    """The mean of ``data`` (t, y, x; a dask or numpy array) over ``mask`` for each frame of
    ``frames``, reading only the rows and columns the mask touches."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the region holds no pixel of the recording")
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    block = np.asarray(data[frames[0]:frames[1], y0:y1, x0:x1], dtype=np.float64)
    return block[:, mask[y0:y1, x0:x1]].mean(axis=1)


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """A boolean disc of ``radius`` pixels around ``centre`` in an image of ``shape``."""
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def delta_f(trace: np.ndarray) -> np.ndarray:
    """ΔF/F of a trace, F0 its :data:`BASELINE` th percentile."""
    f0 = float(np.percentile(trace, BASELINE))
    return trace / f0 - 1.0 if f0 > 0 else trace - f0


class CompareWidget(QWidget):
    """napari dock widget: raw and denoised traces of a clicked cell or a drawn shape."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.raw = QComboBox()
        self.denoised = QComboBox()
        self.radius = QSpinBox()
        self.radius.setRange(1, 100)
        self.radius.setValue(4)
        self.figure = Figure(figsize=(5, 3), layout="constrained")
        self.axes = self.figure.add_subplot()
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.info = QLabel("click a cell in the viewer, or draw a shape in a Shapes layer")
        self.info.setWordWrap(True)
        form = QFormLayout()
        form.addRow("raw", self.raw)
        form.addRow("denoised", self.denoised)
        form.addRow("disc radius (px)", self.radius)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.canvas)
        layout.addWidget(self.info)
        self.traces: dict[str, np.ndarray] = {}
        self.viewer.layers.events.inserted.connect(self._inserted)
        self.viewer.layers.events.removed.connect(self._refresh)
        self.viewer.mouse_drag_callbacks.append(self._clicked)
        for lay in self.viewer.layers:
            if lay._type_string == "shapes":
                lay.events.data.connect(self._shape_changed)
        self._refresh()

    def _inserted(self, event: Any) -> None:
        if event.value._type_string == "shapes":
            event.value.events.data.connect(self._shape_changed)
        self._refresh()

    def _shape_changed(self, event: Any) -> None:
        if getattr(event, "action", "added") in ("added", "changed") and len(event.source.data):
            self.show_shape(event.source)

    def _refresh(self, *_: Any) -> None:
        """Offer the image layers; pick a recording and its denoised layer by default."""
        images = [lay for lay in self.viewer.layers if lay._type_string == "image"]
        for box, role in ((self.raw, "raw"), (self.denoised, "denoised")):
            chosen = box.currentText()
            box.clear()
            box.addItems([lay.name for lay in images])
            default = next((lay.name for lay in images
                            if (lay.metadata.get(META) or {}).get("role") == role), None)
            keep = chosen if box.findText(chosen) >= 0 else default
            if keep is not None:
                box.setCurrentIndex(box.findText(keep))

    def _clicked(self, viewer: Any, event: Any) -> Iterator[None]:
        """A click (not a drag, not while a shape is drawn) takes the disc under it."""
        if any(lay._type_string == "shapes" and lay.mode not in ("pan_zoom", "select")
               for lay in viewer.layers.selection):
            return  # a shape being drawn: its trace is taken once it is added
        yield
        if event.type == "mouse_move":  # a drag (napari updates the event in place)
            return
        raw = self._layer(self.raw)
        if raw is None:
            return
        position = raw.world_to_data(event.position)
        self.show_disc(float(position[-2]), float(position[-1]))

    def _layer(self, box: QComboBox) -> Any:
        try:
            return self.viewer.layers[box.currentText()]
        except (KeyError, ValueError):
            return None

    def _window(self, frames: int) -> tuple[int, int]:
        now = int(self.viewer.dims.current_step[0]) if self.viewer.dims.ndim else 0
        start = max(0, min(now - WINDOW // 2, frames - WINDOW))
        return start, min(frames, start + WINDOW)

    def show_disc(self, y: float, x: float) -> dict[str, np.ndarray]:
        """Plot the traces of the disc around pixel (``y``, ``x``)."""
        raw = self._layer(self.raw)
        if raw is None:
            return {}
        mask = disc(tuple(raw.data.shape[-2:]), (y, x), self.radius.value())
        return self.show_mask(mask, f"disc at y {y:.0f}, x {x:.0f}")

    def show_shape(self, shapes: Any) -> dict[str, np.ndarray]:
        """Plot the traces of the newest shape of a Shapes layer."""
        raw = self._layer(self.raw)
        if raw is None or not len(shapes.data):
            return {}
        newest = np.asarray(shapes.data[-1])[:, -2:]  # its (y, x) vertices, in data units
        from matplotlib.path import Path as Outline

        yy, xx = np.mgrid[:raw.data.shape[-2], :raw.data.shape[-1]]
        scale = np.asarray(shapes.scale[-2:]) / np.asarray(raw.scale[-2:])
        inside = Outline(newest * scale).contains_points(
            np.column_stack([yy.ravel(), xx.ravel()]), radius=0.5)
        return self.show_mask(inside.reshape(yy.shape), "drawn shape")

    def show_mask(self, mask: np.ndarray, what: str) -> dict[str, np.ndarray]:
        """Plot the ΔF/F traces of ``mask`` in the raw and denoised layers."""
        self.traces = {}
        frames = None
        for box, label in ((self.raw, "raw"), (self.denoised, "denoised")):
            lay = self._layer(box)
            if lay is None or lay.data.ndim != 3:
                continue
            frames = frames or self._window(lay.data.shape[0])
            try:
                self.traces[label] = region_trace(lay.data, mask, frames)
            except ValueError as exc:
                self.info.setText(f"error: {exc}")
                return {}
        self.axes.clear()
        for label, trace in self.traces.items():
            self.axes.plot(np.arange(*frames), delta_f(trace), label=label,
                           lw=0.8 if label == "raw" else 1.4)
        self.axes.set_xlabel("frame")
        self.axes.set_ylabel("ΔF/F")
        self.axes.legend(loc="upper right")
        self.canvas.draw_idle()
        if frames is not None:
            self.info.setText(f"{what}: {int(mask.sum())} pixels, frames {frames[0]}–"
                              f"{frames[1] - 1}")
        return self.traces
