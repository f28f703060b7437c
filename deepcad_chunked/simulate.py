"""Synthetic two-photon calcium recordings with ground truth, after the DeepCAD papers' recipe.

A field of view (1 µm per pixel, 30 Hz by default) holds somata with cytosolic, ring-like
footprints (a dim nucleus) of varied size, shape and brightness; each fires spike trains with
bursts, turned into fluorescence by GCaMP6f-like kinetics (fast rise, 0.4–0.8 s decay). Behind
them a neuropil background with slowly fluctuating brightness, crossed by dark blood vessels.
The clean recording, in detected photons, is scaled to the chosen photon level (mean photons
per pixel per frame) and then detected: ``offset + gain · Poisson(photons) + N(0, read_noise²)``,
rounded to uint16. Optionally, as many microscopes store samples, the baseline is subtracted
and negatives clipped to zero, and lines of frames drop out as zeros (``subtract_offset``,
``dropouts``).

The recording is generated :data:`CHUNK` frames at a time (the calcium and background states
carry over), each chunk from its own random stream seeded by ``(seed, chunk)``: memory does not
grow with the number of frames, and a seed always gives the same files.

Files written for ``PREFIX``: ``PREFIX.tif`` (noisy, uint16, one page per frame, ImageJ
metadata with the frame interval), ``PREFIX_clean.tif`` (noise-free, float32, in the same ADU
units), ``PREFIX_truth.npz`` (footprints, neuron parameters, detector settings) and
``PREFIX_traces.npy`` (frames × neurons ΔF/F of every neuron). The spikes behind the traces
are not stored: :func:`spike_counts` draws them again, exactly, from the settings.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy import ndimage

from deepcad_chunked.anatomy import (
    Footprint,
    fine_texture,
    neurite,
    soma,
    vessel_transmission,
    zones,
)
from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.errors import OutputExistsError, SourceError
from deepcad_chunked.store.location import no_folder

log = logging.getLogger(__name__)

#: Frames generated at a time; fixed so that a seed gives the same recording on any machine.
CHUNK = 64
#: Frames over which the neuropil brightness decorrelates, in seconds.
NEUROPIL_TAU_S = 3.0
#: Rise time constant of the calcium indicator, in seconds.
RISE_TAU_S = 0.05
#: Frames from a spike to the first frame its fluorescence shows: a spike counted in frame t
#: (:func:`spike_counts`) raises frames t + 1 onward, the indicator's kernel being zero at lag 0.
SPIKE_LAG = 1
#: Per indicator: rise time constant (s), range of decay time constants (s) and of the ΔF/F of
#: one spike.
INDICATORS = {"fast": (RISE_TAU_S, (0.4, 0.8), (0.3, 0.7)),
              "slow": (0.15, (1.2, 2.0), (0.6, 1.2))}
#: Dense scenes: bleaching's time constant (s) and the fraction of the signal it takes.
BLEACH_TAU_S, BLEACH_FRACTION = 120.0, 0.3
#: Dense scenes: standard deviation of each frame's motion (px).
JITTER_PX = 0.3


@dataclass(frozen=True)
class Scene:
    """Everything of a simulation that does not change over time."""

    footprints: list[Footprint]
    brightness: np.ndarray  # resting fluorescence of each soma, relative to the neuropil
    rate_hz: np.ndarray  # single spikes per second
    burst_hz: np.ndarray  # bursts per second
    amplitude: np.ndarray  # ΔF/F of one spike at its peak
    decay_s: np.ndarray
    background: np.ndarray  # neuropil and vessels, relative units, (y, x)
    vessels: np.ndarray  # transmission of the vessels, 0–1, (y, x)
    scale: float  # photons per relative unit
    rise_s: float = RISE_TAU_S
    kinds: np.ndarray | None = None  # per footprint: 0 a soma, 1 a neurite (None: all somata)
    zones: np.ndarray | None = None  # (k, y, x) neuropil regions fluctuating on their own


def _kernel_stats(decay_s: np.ndarray, frame_rate: float, rise_s: float = RISE_TAU_S
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Peak and sum over time of the unit double-exponential response of each neuron."""
    k = np.arange(int(frame_rate * max(10.0, 8 * float(decay_s.max(initial=0)))))[:, None]
    h = np.exp(-k / (decay_s[None] * frame_rate)) - np.exp(-k / (rise_s * frame_rate))
    return h.max(axis=0), h.sum(axis=0)


def make_scene(config: SimulationConfig) -> Scene:
    """Place vessels, somata (and in a dense scene neurites) and draw every neuron's
    parameters."""
    rng = np.random.default_rng([config.seed, 0])
    extra = np.random.default_rng([config.seed, 6])  # the dense scene's own draws
    dense = config.scene == "dense"
    rise_s, decay_range, amplitude_range = INDICATORS[config.indicator]
    shape = config.size
    vessels = vessel_transmission(rng, shape)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=min(shape) / 12,
                                      mode="wrap")
    texture = (texture - texture.min()) / max(float(np.ptp(texture)), 1e-12)
    background = vessels * (0.05 + 0.6 + 0.4 * texture)
    if dense:
        background *= np.clip(1 + 0.2 * fine_texture(extra, shape), 0.2, None)
    per_soma = 300 if dense else 600
    wanted = (config.neurons if config.neurons is not None
              else round(shape[0] * shape[1] / per_soma))
    centres: list[tuple[float, float, float]] = []
    footprints: list[Footprint] = []
    for _ in range(wanted * 30):
        if len(footprints) == wanted:
            break
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        radius = rng.uniform(4.5, 7.5)
        if vessels[int(cy), int(cx)] < 0.6 or any(
                math.hypot(cy - y, cx - x) < (0.7 if dense else 0.85) * (radius + r)
                for y, x, r in centres):
            continue
        fp = soma(rng, cy, cx, radius, shape, irregular=0.15 if dense else 0.0)
        if fp is not None:
            centres.append((cy, cx, radius))
            footprints.append(fp)
    somata_count = len(footprints)
    if dense:
        for _ in range(round(shape[0] * shape[1] / 1200)):
            fp = neurite(extra, shape)
            if fp is not None:
                footprints.append(fp)
    n = len(footprints)
    brightness = rng.lognormal(math.log(1.2), 0.35, n)
    rate_hz = rng.lognormal(math.log(0.3), 0.5, n)
    burst_hz = rng.uniform(0.02, 0.1, n)
    amplitude = rng.uniform(*amplitude_range, n)
    decay_s = rng.uniform(*decay_range, n)
    # the photon level: the mean over the field and over time of the clean recording
    peak, area = _kernel_stats(decay_s, config.frame_rate, rise_s)
    spikes_per_frame = (rate_hz + 4.0 * burst_hz) / config.frame_rate
    mean_dff = amplitude * spikes_per_frame * area / peak
    somata = np.zeros(shape)
    for fp, b, m in zip(footprints, brightness, mean_dff, strict=True):
        somata[fp.region()] += b * (1 + m) * fp.patch
    mean_relative = float((background + vessels * somata).mean())
    kinds = np.array([0] * somata_count + [1] * (n - somata_count), dtype=np.int8)
    return Scene(footprints, brightness, rate_hz, burst_hz, amplitude, decay_s,
                 background.astype(np.float32), vessels.astype(np.float32),
                 config.photons / mean_relative, rise_s, kinds,
                 zones(extra, shape, 4).astype(np.float32) if dense else None)


@dataclass
class _State:
    """What carries over from one chunk to the next."""

    decay: np.ndarray
    rise: np.ndarray
    neuropil: float
    zones: np.ndarray


def _spikes(rng: np.random.Generator, scene: Scene, frames: int,
            frame_rate: float) -> np.ndarray:
    """Spike counts (frames × neurons): Poisson firing plus bursts of 2–6 spikes."""
    n = len(scene.footprints)
    counts = rng.poisson(scene.rate_hz / frame_rate, size=(frames, n)).astype(np.float64)
    onsets = rng.random((frames, n)) < scene.burst_hz / frame_rate
    for t, i in zip(*np.nonzero(onsets), strict=True):
        size = int(rng.integers(2, 7))
        spread = rng.integers(0, 4, size)  # over about 100 ms
        for dt in spread[t + spread < frames]:
            counts[t + dt, i] += 1
    return counts


def _chunk_spikes(config: SimulationConfig, scene: Scene, index: int
                  ) -> tuple[np.random.Generator, np.ndarray]:
    """The random stream of chunk ``index`` and the spike counts drawn first from it."""
    frames = min(CHUNK, config.frames - index * CHUNK)
    rng = np.random.default_rng([config.seed, 1, index])
    counts = _spikes(rng, scene, CHUNK, config.frame_rate)[:frames]  # a short last chunk: a prefix
    return rng, counts


def spike_counts(config: SimulationConfig, scene: Scene | None = None) -> np.ndarray:
    """The spikes every neuron fired, frame by frame: the ground truth of spike inference.

    The simulation does not store them; they are drawn again from the same random streams,
    so they are exactly the spikes behind ``PREFIX_traces.npy`` and the recording.

    Parameters
    ----------
    config : SimulationConfig
        The simulation's settings (``load_truth(path).config``).
    scene : Scene, optional
        Its scene, when already made.

    Returns
    -------
    numpy.ndarray
        Spike counts, float32, frames × neurons; a spike counted in frame t shows from frame
        t + :data:`SPIKE_LAG` on (pass ``lag=SPIKE_LAG`` to
        :func:`~deepcad_chunked.detection.spike_correlation`).
    """
    scene = scene or make_scene(config)
    out = np.empty((config.frames, len(scene.footprints)), np.float32)
    for index, start in enumerate(range(0, config.frames, CHUNK)):
        out[start:start + CHUNK] = _chunk_spikes(config, scene, index)[1]
    return out


def clean_chunks(config: SimulationConfig, scene: Scene | None = None
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first frame, clean photons (t, y, x) float32, ΔF/F (t, neurons))`` by chunk.

    In a dense scene each neuropil region also fluctuates on its own, the whole field bleaches
    slowly (ΔF/F is unchanged by it) and every frame moves by a small random shift: the clean
    recording is what reaches the detector, shifts included.
    """
    scene = scene or make_scene(config)
    fr = config.frame_rate
    a_decay = np.exp(-1.0 / (scene.decay_s * fr))
    a_rise = math.exp(-1.0 / (scene.rise_s * fr))
    peak, _ = _kernel_stats(scene.decay_s, fr, scene.rise_s)
    rho = math.exp(-1.0 / (NEUROPIL_TAU_S * fr))
    n = len(scene.footprints)
    regions = 0 if scene.zones is None else len(scene.zones)
    state = _State(np.zeros(n), np.zeros(n), 0.0, np.zeros(regions))
    for index, start in enumerate(range(0, config.frames, CHUNK)):
        frames = min(CHUNK, config.frames - start)
        rng, counts = _chunk_spikes(config, scene, index)
        dff = np.empty((frames, n))
        neuropil = np.empty(frames)
        shocks = rng.standard_normal(frames) * 0.05 * math.sqrt(1 - rho**2)
        own = np.random.default_rng([config.seed, 7, index]).standard_normal(
            (frames, regions)) * 0.1 * math.sqrt(1 - rho**2)
        local = np.empty((frames, regions))
        for t in range(frames):
            state.decay = state.decay * a_decay + counts[t]
            state.rise = state.rise * a_rise + counts[t]
            dff[t] = scene.amplitude * (state.decay - state.rise) / peak
            state.neuropil = state.neuropil * rho + shocks[t]
            neuropil[t] = 1.0 + state.neuropil
            state.zones = state.zones * rho + own[t]
            local[t] = state.zones
        level = neuropil[:, None, None].astype(np.float32)
        if scene.zones is not None:
            level = level + np.tensordot(local, scene.zones, axes=1).astype(np.float32)
        clean = scene.background[None] * level
        for i, fp in enumerate(scene.footprints):
            region = (slice(None), *fp.region())
            weights = (scene.brightness[i] * fp.patch * scene.vessels[fp.region()])
            clean[region] += (1.0 + dff[:, i, None, None]).astype(np.float32) * weights
        if config.scene == "dense":
            seconds = (start + np.arange(frames)) / fr
            bleach = 1 - BLEACH_FRACTION * (1 - np.exp(-seconds / BLEACH_TAU_S))
            clean *= bleach[:, None, None].astype(np.float32)
            moves = np.random.default_rng([config.seed, 5, index]).normal(
                0, JITTER_PX, (frames, 2))
            for t in range(frames):
                clean[t] = ndimage.shift(clean[t], moves[t], order=1, mode="nearest")
        yield start, clean * np.float32(scene.scale), dff.astype(np.float32)


def detect(photons: np.ndarray, config: SimulationConfig, chunk: int) -> np.ndarray:
    """Noisy detector samples (uint16) of the clean photon counts of chunk ``chunk``."""
    shot = np.random.default_rng([config.seed, 2, chunk])
    adu = config.offset + config.gain * shot.poisson(photons).astype(np.float32)
    if config.read_noise:
        read = np.random.default_rng([config.seed, 3, chunk])
        adu += read.normal(0.0, config.read_noise, photons.shape).astype(np.float32)
    if config.subtract_offset:
        adu -= np.float32(config.offset)  # then clipped at zero below, as stored by the software
    if config.dropouts:
        lost = np.random.default_rng([config.seed, 4, chunk]).random(photons.shape[:2])
        adu[lost < config.dropouts] = 0
    return np.clip(np.round(adu), 0, 65535).astype(np.uint16)


class _TiffStream:
    """A TIFF written frame by frame from another thread, so two can be written at once."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype,
                 **kwargs: Any) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, args=(path, shape, dtype, kwargs),
                                        daemon=True)
        self._thread.start()

    def _frames(self) -> Iterator[np.ndarray]:
        while (chunk := self._queue.get()) is not None:
            yield from chunk

    def _write(self, path: Path, shape: tuple[int, ...], dtype: np.dtype,
               kwargs: dict[str, Any]) -> None:
        try:
            tifffile.imwrite(path, self._frames(), shape=shape, dtype=dtype,
                             photometric="minisblack", **kwargs)
        except BaseException as exc:  # handed to the producing thread
            self._error = exc

    def put(self, chunk: np.ndarray | None) -> None:
        """Queue frames (None: the end), raising the writer's error if it failed."""
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(chunk, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for the file to be finished."""
        if self._thread.is_alive():
            self.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class SimulationFiles:
    """The files of a simulation."""

    raw: Path
    clean: Path
    truth: Path
    traces: Path


def output_paths(prefix: str | Path) -> SimulationFiles:
    """The files a simulation with ``prefix`` writes."""
    prefix = Path(prefix).expanduser().absolute()
    stem = prefix.name[:-4] if prefix.name.lower().endswith(".tif") else prefix.name
    base = prefix.with_name(stem)
    return SimulationFiles(base.with_name(stem + ".tif"), base.with_name(stem + "_clean.tif"),
                           base.with_name(stem + "_truth.npz"),
                           base.with_name(stem + "_traces.npy"))


def simulate(prefix: str | Path, config: SimulationConfig | None = None, *,
             overwrite: bool = False) -> SimulationFiles:
    """Write a synthetic recording and its ground truth.

    Parameters
    ----------
    prefix : str or Path
        Path prefix of the files (see the module docstring); a ``.tif`` suffix is dropped.
    config : SimulationConfig, optional
        Frames, size, seed, photon level, detector.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    SimulationFiles
        Paths of the noisy recording, the clean one, the ground truth and the traces.

    Raises
    ------
    OutputExistsError
        When a file exists and ``overwrite`` is false.
    SourceError
        When the folder of ``prefix`` does not exist.
    """
    config = config or SimulationConfig()
    files = output_paths(prefix)
    if not files.raw.parent.is_dir():
        raise SourceError(f"cannot write {files.raw}: {no_folder(files.raw.parent)}")
    for path in (files.raw, files.clean, files.truth, files.traces):
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    scene = make_scene(config)
    shape = (config.frames, *config.size)
    log.info("simulating %d frames of %d×%d px: %d neurons, %.3g photons per pixel per frame",
             config.frames, *config.size, len(scene.footprints), config.photons)
    partial = {name: path.with_name(path.name + ".partial") for name, path in
               (("raw", files.raw), ("clean", files.clean), ("truth", files.truth),
                ("traces", files.traces))}
    big = math.prod(shape) * 4 > 2**31
    raw = _TiffStream(partial["raw"], shape, np.dtype(np.uint16), bigtiff=big, imagej=not big,
                      metadata={"axes": "TYX", "finterval": 1 / config.frame_rate,
                                "unit": "um"}, resolution=(1.0, 1.0))
    clean = _TiffStream(partial["clean"], shape, np.dtype(np.float32), bigtiff=big,
                        metadata={"axes": "TYX"})
    traces = np.lib.format.open_memmap(partial["traces"], mode="w+", dtype=np.float32,
                                       shape=(config.frames, len(scene.footprints)))
    try:
        for start, photons, dff in clean_chunks(config, scene):
            raw.put(detect(photons, config, start // CHUNK))
            clean.put(config.baseline + config.gain * photons)
            traces[start:start + len(dff)] = dff
    except BaseException:
        raw.put(None)
        clean.put(None)
        raise
    finally:
        traces.flush()
        del traces
    raw.close()
    clean.close()
    _save_truth(partial["truth"], scene, config)
    for name, path in partial.items():
        path.replace(getattr(files, name))
    return files


def _save_truth(path: Path, scene: Scene, config: SimulationConfig) -> None:
    corners = np.array([(fp.y, fp.x) for fp in scene.footprints], dtype=np.int64).reshape(-1, 2)
    shapes = np.array([fp.patch.shape for fp in scene.footprints],
                      dtype=np.int64).reshape(-1, 2)
    flat = (np.concatenate([fp.patch.ravel() for fp in scene.footprints])
            if scene.footprints else np.zeros(0, np.float32))
    with open(path, "wb") as fh:
        np.savez_compressed(fh, corners=corners, shapes=shapes, patches=flat,
                            brightness=scene.brightness, rate_hz=scene.rate_hz,
                            burst_hz=scene.burst_hz, amplitude=scene.amplitude,
                            decay_s=scene.decay_s, vessels=scene.vessels,
                            kinds=(scene.kinds if scene.kinds is not None
                                   else np.zeros(len(scene.footprints), np.int8)),
                            config=np.array(json.dumps(config.model_dump())))


@dataclass(frozen=True)
class Truth:
    """Ground truth of a simulation, as stored in ``PREFIX_truth.npz``."""

    footprints: list[Footprint]
    config: SimulationConfig
    kinds: np.ndarray | None = None  # per footprint: 0 a soma, 1 a neurite

    @property
    def somata(self) -> list[Footprint]:
        """The footprints of somata (what cell detection should find)."""
        if self.kinds is None:
            return list(self.footprints)
        return [fp for fp, kind in zip(self.footprints, self.kinds, strict=True) if kind == 0]


def load_truth(path: str | Path) -> Truth:
    """Read the footprints and settings of a simulation.

    Raises
    ------
    SourceError
        When ``path`` is missing or not a ground-truth file.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            corners, shapes, flat = data["corners"], data["shapes"], data["patches"]
            config = SimulationConfig(**json.loads(str(data["config"])))
            kinds = data["kinds"] if "kinds" in data.files else None
    except (OSError, KeyError, ValueError) as exc:
        raise SourceError(f"{path} is not a simulation's ground truth ({exc})") from None
    footprints, offset = [], 0
    for (y, x), (h, w) in zip(corners, shapes, strict=True):
        patch = flat[offset:offset + h * w].reshape(h, w)
        footprints.append(Footprint(int(y), int(x), patch))
        offset += h * w
    return Truth(footprints, config, kinds)
