"""What the Denoise and Follow widgets share: a form, a start and a stop button, a one-line
status, and one job at a time in a background thread that a stop request ends cleanly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from deepcad_chunked import interrupt
from deepcad_chunked.errors import DeepCADError

log = logging.getLogger(__name__)


class JobPanel(QWidget):
    """A napari dock widget that runs one job at a time in a background thread.

    Subclasses fill :attr:`form`, put what else they show in :attr:`below`, and call
    :meth:`run_in_background`; the stop button asks the job to stop as a Ctrl-C would
    (:func:`deepcad_chunked.interrupt.request`), and a job that stops so returns what to say.
    """

    def __init__(self, napari_viewer: Any, start: str, stop: str, stopped: str,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.stopped = stopped  # what is said when a job ends on a stop request
        self.worker: Any = None
        self.form = QFormLayout()
        self.start_button = QPushButton(start)
        self.stop_button = QPushButton(stop)
        self.stop_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.below = QVBoxLayout()
        layout = QVBoxLayout(self)
        layout.addLayout(self.form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addLayout(self.below)
        layout.addStretch()
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)

    def start(self) -> None:
        """Start the job (subclasses)."""
        raise NotImplementedError

    def run_in_background(self, job: Callable[..., Any], *args: Any,
                          done: Callable[[Any], None]) -> None:
        """Run ``job(*args)`` in a background thread; ``done(result)`` in this one after it,
        or what stopped it said in one line."""
        from napari.qt.threading import create_worker

        interrupt.reset()
        self.worker = create_worker(_stoppable, self.stopped, job, *args,
                                    _start_thread=False)
        self.worker.returned.connect(lambda result: done(result) if not isinstance(
            result, _Said) else self.say(result.said))
        self.worker.finished.connect(self._idle)
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.worker.start()

    def stop(self) -> None:
        """Stop the job where it stands; what it finished stays, and starting again resumes."""
        if self.worker is not None:
            self.say("stopping…")
            interrupt.request()

    def say(self, text: str) -> None:
        """Show one line of status (and log it)."""
        self.status.setText(text)
        log.info("%s", text)

    def _idle(self) -> None:
        self.start_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.worker = None


class _Said:
    """What a job that stopped on a request or failed returns instead: one line to show."""

    def __init__(self, said: str) -> None:
        self.said = said


def _stoppable(stopped: str, job: Callable[..., Any], *args: Any) -> Any:
    """Run the job; a stop request or an error becomes one line for the widget (never a
    traceback in napari's notifications; an unexpected error's traceback goes to the log)."""
    try:
        return job(*args)
    except KeyboardInterrupt:  # a stop request reached the job's next check
        return _Said(stopped)
    except DeepCADError as exc:
        return _Said(f"error: {one_line(exc)}")
    except Exception as exc:
        log.exception("the job failed")
        return _Said(f"error: {one_line(exc)}")
    finally:
        interrupt.reset()


def one_line(exc: BaseException) -> str:
    """An error as one line: ours as they are said on the command line, others with their
    type."""
    text = str(exc).strip().splitlines()
    if isinstance(exc, DeepCADError):
        return text[-1] if text else type(exc).__name__
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
