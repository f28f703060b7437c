"""The whole job in one call: convert → train → denoise (→ export), and a self-checking demo.

``run`` keeps its products in one folder — ``recording.zarr``, ``model/`` (the training run),
``denoised.zarr`` and, when asked, ``denoised.ome.tif`` — and skips or resumes the stages a
previous run finished or left half done, so rerunning an interrupted command carries on.
``demo`` simulates a small recording with ground truth, runs the pipeline on it, scores the
result and draws the report.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster

from deepcad_chunked.cluster import connect
from deepcad_chunked.config import (
    ConvertConfig,
    DenoiseConfig,
    SimulationConfig,
    TrainConfig,
)
from deepcad_chunked.errors import ConfigError, OutputExistsError, SourceError
from deepcad_chunked.jobs.convert import convert, stale_sources
from deepcad_chunked.jobs.export import export
from deepcad_chunked.sources.registry import GLOB_CHARS, discover_sources, file_of, open_sources
from deepcad_chunked.store.attributes import read_ours
from deepcad_chunked.store.lifecycle import remove_store
from deepcad_chunked.store.location import is_url, local_folder, no_folder
from deepcad_chunked.store.outputs import open_folder
from deepcad_chunked.store.pins import check_disjoint
from deepcad_chunked.store.recording import open_recording
from deepcad_chunked.training.ranks import launched

log = logging.getLogger(__name__)

#: What ``run`` writes inside its folder.
PRODUCTS = ("recording.zarr", "model", "denoised.zarr", "denoised.ome.tif")


@dataclass(frozen=True)
class RunResult:
    """Paths of what :func:`run` produced."""

    recording: Path
    model: Path
    denoised: Path
    exported: Path | None
    verdict: dict[str, Any] | None = None


def is_complete(store: Path) -> bool:
    """Whether ``store`` is one of our stores, finished (False while absent or unfinished)."""
    ours = read_ours(store) if store.is_dir() else None
    return ours is not None and ours.complete


def run(sources: str | Path | Sequence[str | Path], outdir: str | Path, *,
        convert_config: ConvertConfig | None = None, train_config: TrainConfig | None = None,
        denoise_config: DenoiseConfig | None = None, export_tiff: bool = False,
        cluster: str | Client | None = "local", workers: int | None = None,
        progress: bool | None = None, overwrite: bool = False, check: bool = True
        ) -> RunResult:
    """Convert, train on and denoise a recording, with defaults, in one folder; say whether
    denoising helped.

    Parameters
    ----------
    sources : path, glob, folder or sequence of them
        The TIFF archive.
    outdir : str or Path
        Folder of the products (created if needed).
    convert_config, train_config, denoise_config : optional
        Options of each stage (``overwrite`` in them is ignored: see ``overwrite``).
    export_tiff : bool
        Also write the denoised recording as an OME-TIFF.
    cluster, workers
        The dask cluster of conversion and denoising (one LocalCluster for both by default).
        Training runs in this process with a local cluster, and as one task on a worker of
        any other (a GPU job of a batch system, say).
    progress : bool, optional
        Progress bars.
    overwrite : bool
        Start again, removing this command's products (never anything else in ``outdir``).
    check : bool
        End with :func:`~deepcad_chunked.jobs.verdict.verdict` (the held-out score against the
        best Gaussian and the intensity check), logged and returned in ``verdict``.

    Returns
    -------
    RunResult

    Raises
    ------
    OutputExistsError
        When a product would be, contain or lie inside a source (``-o`` a source folder, say),
        or a finished product was made from other sources or with another model.
    LockedError
        When another ``run`` works in ``outdir``, or another command writes one of its
        products.
    """
    if launched() is not None:
        raise ConfigError("run converts, trains and denoises once: a launcher (torchrun) "
                          "starts several processes of `train` only (convert first, denoise "
                          "after)")
    outdir = local_folder(outdir, "run's output folder (it holds the training run)")
    named = [sources] if isinstance(sources, (str, Path)) else list(sources)
    raw = convert_config.raw if convert_config else None
    specs = discover_sources(named, raw)
    files = list(dict.fromkeys(file_of(s) for s in specs if not is_url(s)))
    folders = [str(Path(p).expanduser()) for p in named
               if not is_url(str(p)) and Path(p).expanduser().is_dir()]
    store, run_dir = outdir / "recording.zarr", outdir / "model"
    denoised, exported = outdir / "denoised.zarr", outdir / "denoised.ome.tif"
    for product in (store, run_dir, denoised, exported):  # before anything is touched
        check_disjoint(product, [*files, *folders])
        _check_patterns(named, product)
    if not outdir.parent.is_dir():
        raise SourceError(f"cannot write {outdir}: {no_folder(outdir.parent)}")
    with open_folder(outdir, command="run"):
        if overwrite:
            for path in (store, run_dir, denoised, exported):
                remove_store(path, command="run --overwrite")
        with connect(cluster, workers=workers) as client:
            if is_complete(store):
                stale = stale_sources(open_recording(store), open_sources(specs, raw))
                if stale is not None:
                    raise OutputExistsError(
                        f"{store} no longer matches its sources: {stale}; pass --overwrite to "
                        "convert, train and denoise again (it replaces recording.zarr, "
                        "model/, denoised.zarr" + (" and denoised.ome.tif" if exported.exists()
                                                   else "") + ")")
                log.info("%s is already converted from the same, unchanged files", store)
            else:
                convert(specs, store, config=convert_config, cluster=client, progress=progress)
            result = _train(store, run_dir, train_config, progress,
                            None if _is_local(cluster) else client)
            if is_complete(denoised):
                check_denoised_with(denoised, result)
                log.info("%s is already denoised", denoised)
            else:
                from deepcad_chunked.jobs.denoise import denoise

                # a local cluster of its own: inference splits the machine differently
                denoise(store, result, denoised, config=denoise_config,
                        cluster="local" if cluster in (None, "local") else client,
                        workers=workers,
                        progress=progress)
        if export_tiff and not exported.exists():
            export(denoised, exported, progress=progress)
    said = None
    if check:
        from deepcad_chunked.jobs.verdict import verdict

        said = verdict(store, denoised, result,
                       device=train_config.device if train_config else "auto")
        for line in said["lines"]:
            log.info("%s", line)
    return RunResult(store, result, denoised, exported if export_tiff else None, said)


def _check_patterns(named: Sequence[str | Path], product: Path) -> None:
    """Refuse a product that a glob pattern among the sources would take on a rerun."""
    for item in named:
        text = str(Path(item).expanduser().absolute())
        if GLOB_CHARS.search(str(item)) and fnmatch.fnmatch(str(product), text):
            raise OutputExistsError(f"the source pattern {str(item)!r} would take the output "
                                    f"{product} as a source when the command is rerun; choose "
                                    "an output folder the pattern does not match")


def check_denoised_with(denoised: Path, model: Path | str,
                        remedy: str = "pass --overwrite to start again") -> None:
    """Refuse a finished denoised store made with another model than ``model``.

    Raises
    ------
    OutputExistsError
        Saying ``remedy``.
    """
    from deepcad_chunked.model import Checkpoint

    made_with = (open_recording(denoised).stored.model or {}).get("digest")
    if made_with != Checkpoint.load(model).digest:
        raise OutputExistsError(f"{denoised} was denoised with another model than {model}; "
                                f"{remedy}")


def _train(store: Path, run_dir: Path, config: TrainConfig | None,
           progress: bool | None, client: Client | None) -> Path:
    from deepcad_chunked.jobs.train import train

    result = train([store], run_dir, config=config, resume=True, progress=progress,
                   cluster=client)
    return result.best


def _is_local(cluster: str | Client | None) -> bool:
    """Whether the cluster is a LocalCluster (then training stays in this process)."""
    if cluster in (None, "local"):
        return True
    return isinstance(cluster, Client) and isinstance(cluster.cluster, LocalCluster)


#: The demo's recording and training budget: minutes on a 2-core CPU. Its training (the
#: default bypass, the L2 loss, a moving average of the weights, 800 steps at f = 8) is the
#: best measured at this budget (benchmarks/RESULTS.md, issue 17).
DEMO_SIMULATION = SimulationConfig(frames=1200, size=(128, 128), photons=1.0, seed=0)
DEMO_TRAINING = TrainConfig(features=8, epochs=4, steps_per_epoch=200, loss="l2", average=0.99)


def demo(outdir: str | Path, *, simulation: SimulationConfig = DEMO_SIMULATION,
         training: TrainConfig = DEMO_TRAINING, cluster: str | Client | None = "local",
         workers: int | None = None, progress: bool | None = None,
         overwrite: bool = False) -> dict[str, Any]:
    """Simulate a recording, denoise it with :func:`run`, score it and draw the report.

    Returns
    -------
    dict
        The scores of :func:`deepcad_chunked.metrics.score`, with ``verdict`` (the held-out
        score and the intensity check of :func:`run`), ``report`` (the PNG) and ``run`` (the
        products of :func:`run`).
    """
    from deepcad_chunked.metrics import score
    from deepcad_chunked.report import preview
    from deepcad_chunked.simulate import load_truth, output_paths, simulate

    outdir = Path(outdir).expanduser().absolute()
    if not outdir.parent.is_dir():
        raise SourceError(f"cannot write {outdir}: {no_folder(outdir.parent)}")
    outdir.mkdir(exist_ok=True)
    files = output_paths(outdir / "simulated")
    have = all(p.exists() for p in (files.raw, files.clean, files.truth))
    if overwrite or not have or load_truth(files.truth).config != simulation:
        if have and not overwrite:
            log.info("the simulation in %s has other settings: starting again", outdir)
        simulate(files.raw, simulation, overwrite=True)
        overwrite = True  # products of another recording must go
    # float32 output: rounding to the raw integers would add its own error to the scores
    products = run(files.raw, outdir, train_config=training,
                   denoise_config=DenoiseConfig(dtype="float32"), cluster=cluster,
                   workers=workers, progress=progress, overwrite=overwrite)
    scores = score(products.denoised, files.clean, files.raw, footprints=files.truth)
    scores["verdict"] = products.verdict
    report = preview(files.raw, products.denoised, outdir / "report.png",
                     footprints=files.truth)
    return {**scores, "report": str(report), "run": {k: str(v) for k, v in
                                                      products.__dict__.items()
                                                      if k != "verdict"}}
