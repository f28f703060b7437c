"""The Denoise widget: choose a recording and a model, run convert → train → denoise in a
background thread with a progress bar per stage, cancel it (the job resumes when run again),
see the result beside the recording and how it scores against the best Gaussian."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox, QLabel, QLineEdit, QProgressBar, QSpinBox, QWidget

from deepcad_chunked.config import TrainConfig
from deepcad_chunked.jobs.run import RunResult
from deepcad_chunked.progress import reporting
from deepcad_chunked.store.recording import open_recording
from deepcad_chunked.viewer.job_panel import JobPanel
from deepcad_chunked.viewer.layers import META, layer
from deepcad_chunked.viewer.reader import link_pairs

#: The stages shown, as the jobs name their progress bars.
STAGES = ("convert", "train", "denoise")
#: The recording combo box's first entry: the path typed below it.
TYPED = "file, folder or store below"


class _Relay(QObject):
    """Carries a job's progress from its thread to the widget's."""

    progressed = Signal(str, int, int)


class DenoiseWidget(JobPanel):
    """napari dock widget: denoise a recording (see the module's description)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, "Run", "Cancel",
                         "cancelled: what was finished is kept; Run again resumes", parent)
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
        #: other training options (TrainConfig's fields), for callers that need them
        self.train_options: dict[str, Any] = {}
        for label, field in (("recording", self.recording), ("", self.source),
                             ("model", self.model), ("epochs", self.epochs),
                             ("output", self.output), ("cluster", self.cluster)):
            self.form.addRow(label, field)
        self.bars = {stage: QProgressBar() for stage in STAGES}
        for stage, bar in self.bars.items():
            bar.setFormat(f"{stage} %p%")
            self.form.addRow(stage, bar)
        self.score = QLabel("")
        self.score.setWordWrap(True)
        self.below.addWidget(self.score)
        self.relay = _Relay()
        self.relay.progressed.connect(self._progressed)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    def _refresh(self, *_: Any) -> None:
        """The recording choices: the path typed, and every layer backed by one of our stores
        that is not itself denoised."""
        chosen = self.recording.currentText()
        self.recording.clear()
        self.recording.addItem(TYPED)
        for lay in self.viewer.layers:
            ours = lay.metadata.get(META) if hasattr(lay, "metadata") else None
            if ours and ours.get("role") != "denoised" and ours.get("store"):
                self.recording.addItem(lay.name, ours["store"])
        self.recording.setCurrentIndex(max(0, self.recording.findText(chosen)))

    def chosen_source(self) -> str:
        """The recording to denoise: the chosen layer's store, or the path typed."""
        store = self.recording.currentData()
        return str(store) if store else self.source.text().strip()

    def start(self) -> None:
        """Start the job in a background thread."""
        source, output = self.chosen_source(), self.output.text().strip()
        if not source or not output:
            self.say("error: choose a recording and an output folder")
            return
        config = TrainConfig(**{**self.train_options, "epochs": self.epochs.value()})
        for bar in self.bars.values():
            bar.setValue(0)
        self.score.setText("")
        self.say("running…")
        self.run_in_background(_job, source, output, self.model.text().strip() or None,
                               config, self.cluster.text().strip() or "local", self.relay,
                               done=self._finished)

    def _progressed(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is not None:
            bar.setMaximum(max(total, 1))
            bar.setValue(min(done, max(total, 1)))

    def _finished(self, outcome: RunResult) -> None:
        self.result = outcome
        for bar in self.bars.values():  # a stage not needed (a store or a model given)
            bar.setMaximum(max(bar.maximum(), 1))
            bar.setValue(bar.maximum())
        rec, den = open_recording(outcome.recording), open_recording(outcome.denoised)
        name = f"{Path(str(outcome.denoised)).parent.name} denoised"
        data, kwargs, kind = layer(den, name, like=rec, pair=str(rec.path))
        kwargs["metadata"][META]["role"] = "denoised"
        from napari.layers import Layer

        self.viewer.add_layer(Layer.create(data, kwargs, kind))
        link_pairs(self.viewer)
        self.score.setText("\n".join((outcome.verdict or {}).get("lines", [])))
        self.say(f"done: {outcome.denoised}")


def _job(source: str, output: str, model: str | None, config: TrainConfig, cluster: str,
         relay: _Relay) -> RunResult:
    """The background thread's work, its progress bars reported to the widget."""
    from deepcad_chunked.viewer.pipeline import denoise_anything

    with reporting(relay.progressed.emit):
        return denoise_anything(source, output, model=model, train_config=config,
                                cluster=cluster)
