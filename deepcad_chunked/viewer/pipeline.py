"""What the Denoise widget runs: ``run``'s job for any source and any model.

A TIFF archive (or any source format) with no model is exactly ``run`` (convert, train,
denoise, the held-out verdict); a recording store, or a model given, takes the same steps
into the same output folder, leaving out those not needed. Every step resumes what an
earlier, interrupted attempt left.
"""

from __future__ import annotations

from pathlib import Path

from deepcad_chunked.config import DenoiseConfig, TrainConfig
from deepcad_chunked.jobs.convert import convert
from deepcad_chunked.jobs.denoise import denoise
from deepcad_chunked.jobs.run import RunResult, check_denoised_with, is_complete, run
from deepcad_chunked.jobs.train import train
from deepcad_chunked.jobs.verdict import verdict
from deepcad_chunked.store.location import local_folder, resolve
from deepcad_chunked.viewer.layers import is_store


def denoise_anything(source: str | Path, outdir: str | Path, *, model: str | Path | None = None,
                     train_config: TrainConfig | None = None,
                     denoise_config: DenoiseConfig | None = None,
                     cluster: str = "local") -> RunResult:
    """Denoise ``source`` into ``outdir`` (``recording.zarr``, ``model/``, ``denoised.zarr``).

    Parameters
    ----------
    source : str or Path
        A file, folder or pattern of any source format, or a recording store (ours or
        another tool's OME-Zarr), local or a URL.
    outdir : str or Path
        A local folder.
    model : str or Path, optional
        A checkpoint or a DeepCAD-RT ``.pth``; None: train one on the recording.
    train_config, denoise_config : optional
    cluster : str
        ``local`` or a scheduler's address.

    Returns
    -------
    RunResult
        With the verdict (held-out score against the best Gaussian, intensity check).

    Raises
    ------
    DeepCADError
        What ``run``, ``train`` or ``denoise`` refuse, in one line.
    """
    store_given = is_store(resolve(source))
    if model is None and not store_given:
        return run(source, outdir, train_config=train_config, denoise_config=denoise_config,
                   cluster=cluster)
    folder = local_folder(outdir, "the output folder")
    folder.mkdir(parents=True, exist_ok=True)
    if store_given:
        store: Path | str = str(source)
    else:
        store = folder / "recording.zarr"
        if not is_complete(store):  # absent, or cut short: convert resumes it
            convert(source, store, cluster=cluster)
    if model is None:
        model = train([store], folder / "model", config=train_config, resume=True).best
    denoised = folder / "denoised.zarr"
    if is_complete(denoised):
        check_denoised_with(denoised, model, remedy="choose another output folder")
    else:
        denoise(store, model, denoised, config=denoise_config, cluster=cluster)
    device = train_config.device if train_config else "auto"
    said = verdict(store, denoised, model, device=device)
    return RunResult(Path(str(store)), Path(model), denoised, None, said)
