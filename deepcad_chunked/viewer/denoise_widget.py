"""The Denoise widget: choose a recording and a model, run convert → train → denoise in a
background thread with a progress bar per stage, cancel it (the job resumes when run again),
see the result beside the recording and how it scores against the best Gaussian."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from deepcad_chunked import interrupt
from deepcad_chunked.config import TrainConfig
from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.jobs.run import RunResult
from deepcad_chunked.progress import reporting
from deepcad_chunked.store.recording import open_recording
from deepcad_chunked.viewer.layers import META, layer
from deepcad_chunked.viewer.reader import link_pairs

log = logging.getLogger(__name__)

#: The stages shown, as the jobs name their progress bars.
STAGES = ("convert", "train", "denoise")
#: The recording combo box's first entry: the path typed below it.
TYPED = "file, folder or store below"


class _Relay(QObject):
    """Carries a job's progress from its thread to the widget's."""

    progressed = Signal(str, int, int)


class DenoiseWidget(QWidget):
    """napari dock widget: denoise a recording (see the module's description)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.result: RunResult | None = None
        self.recording = QComboBox()
        self.source = QLineEdit()
        self.source.setPlaceholderText("TIFF, folder, HDF5, NWB, .zarr or s3:// URL")
        self.model = QLineEdit()
        self.model.setPlaceholderText("empty: train a model on the recording")
        self.output = QLineEdit()
        self.output.setPlaceholderText("output folder")
        self.cluster = QLineEdit("local")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1000)
        self.epochs.setValue(TrainConfig().epochs)
        self.train_options: dict[str, Any] = {}
        form = QFormLayout()
        form.addRow("recording", self.recording)
        form.addRow("", self.source)
        form.addRow("model", self.model)
        form.addRow("epochs", self.epochs)
        form.addRow("output", self.output)
        form.addRow("cluster", self.cluster)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.bars = {stage: QProgressBar() for stage in STAGES}
        for stage, bar in self.bars.items():
            bar.setFormat(f"{stage} %p%")
            bar.setValue(0)
            form.addRow(stage, bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.score = QLabel("")
        self.score.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.score)
        layout.addStretch()
        self.relay = _Relay()
        self.relay.progressed.connect(self._progressed)
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    # ------------------------------------------------------------------ choices
    def _refresh(self, *_: Any) -> None:
        """The recording choices: the path typed, and every layer backed by one of our stores
        that is not itself denoised."""
        chosen = self.recording.currentText()
        self.recording.clear()
        self.recording.addItem(TYPED)
        for lay in self.viewer.layers:
            ours = lay.metadata.get(META) if hasattr(lay, "metadata") else None
            if ours and ours.get("role") != "denoised":
                self.recording.addItem(lay.name, ours["store"])
        index = self.recording.findText(chosen)
        self.recording.setCurrentIndex(max(0, index))

    def chosen_source(self) -> str:
        """The recording to denoise: the chosen layer's store, or the path typed."""
        store = self.recording.currentData()
        return str(store) if store else self.source.text().strip()

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """Start the job in a background thread."""
        from napari.qt.threading import create_worker

        source, output = self.chosen_source(), self.output.text().strip()
        if not source or not output:
            self._said("error: choose a recording and an output folder")
            return
        model = self.model.text().strip() or None
        config = TrainConfig(**{**self.train_options, "epochs": self.epochs.value()})
        for bar in self.bars.values():
            bar.setValue(0)
        self.score.setText("")
        self._said("running…")
        interrupt.reset()
        self.worker = create_worker(_job, source, output, model, config,
                                    self.cluster.text().strip() or "local", self.relay,
                                    _start_thread=False)
        self.worker.returned.connect(self._finished)
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(self._idle)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.worker.start()

    def cancel(self) -> None:
        """Stop the job where it stands; what it finished stays, and Run resumes it."""
        if self.worker is not None:
            self._said("cancelling…")
            interrupt.request()

    def _progressed(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is not None:
            bar.setMaximum(max(total, 1))
            bar.setValue(min(done, max(total, 1)))

    def _finished(self, outcome: RunResult | str) -> None:
        if isinstance(outcome, str):  # cancelled
            self._said(outcome)
            return
        self.result = outcome
        for bar in self.bars.values():
            if bar.value() < bar.maximum() and bar.value() == 0:
                bar.setMaximum(1)  # a stage not needed (a store given, a model given)
            bar.setValue(bar.maximum())
        rec = open_recording(outcome.recording)
        den = open_recording(outcome.denoised)
        name = f"{Path(str(outcome.denoised)).parent.name} denoised"
        data, kwargs, kind = layer(den, name, like=rec, pair=str(rec.path))
        kwargs["metadata"][META]["role"] = "denoised"
        self.viewer.add_layer(_as_layer(data, kwargs, kind))
        link_pairs(self.viewer)
        lines = (outcome.verdict or {}).get("lines", [])
        self.score.setText("\n".join(lines))
        self._said(f"done: {outcome.denoised}")

    def _failed(self, exc: BaseException) -> None:
        self._said(f"error: {_one_line(exc)}")

    def _idle(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.worker = None

    def _said(self, text: str) -> None:
        self.status.setText(text)
        log.info("%s", text)


def _job(source: str, output: str, model: str | None, config: TrainConfig, cluster: str,
         relay: _Relay) -> RunResult | str:
    """The background thread's work; a cancel returns what to say instead of a result."""
    from deepcad_chunked.viewer.pipeline import denoise_anything

    try:
        with reporting(relay.progressed.emit):
            return denoise_anything(source, output, model=model, train_config=config,
                                    cluster=cluster)
    except KeyboardInterrupt:
        return "cancelled: what was finished is kept; Run again resumes"
    finally:
        interrupt.reset()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, DeepCADError):
        text = str(exc).strip()
        return text.splitlines()[-1] if text else type(exc).__name__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _as_layer(data: Any, kwargs: dict[str, Any], kind: str) -> Any:
    from napari.layers import Layer

    return Layer.create(data, kwargs, kind)
