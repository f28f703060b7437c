"""Are intensities kept? The per-band intensity check with and without the calibration.

Usage: python benchmarks/intensity.py [--real ../shared/data/mouse_2p_500x64x64.tif]
       [--cases somata,1,offset somata,1,clipped dense,1,clipped somata,0.3,clipped ...]
       [--record]

On a real recording (when given) and on the demo's simulation (1200×128², seed 0) in each case
``SCENE,PHOTONS,offset|clipped`` (the default or the dense scene, photons per pixel per frame,
stored with the detector's offset or offset-subtracted, clipped at zero with 0.5 % line
dropouts):
one network is trained with the demo's settings; it denoises the recording with its intensity
calibration and without it (the same weights: the calibration does not change training), and
for each, and for the raw frames and the best Gaussian filter, the table gives the denoised over
raw temporal mean in the dimmest, second and brightest decile of pixels and the worst decile,
the held-out score's excess (no ground truth) and, on simulations, the SNR and the neurons'
trace correlation with the truth (``metrics.score``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from _common import denoise_in_memory, machine, publish
from scipy import ndimage

from deepcad_chunked import convert, train
from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.heldout import heldout_score
from deepcad_chunked.jobs.run import DEMO_SIMULATION, DEMO_TRAINING
from deepcad_chunked.metrics import GAUSSIANS, intensity_bands, score
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.simulate import simulate


def _uncalibrated(model: Path) -> Path:
    ckpt = Checkpoint.load(model)
    ckpt.normalization = {k: v for k, v in ckpt.normalization.items() if k != "calibration"}
    return ckpt.save(model.with_name("uncalibrated.pt"))


def _gaussian(raw: np.ndarray, name: str) -> np.ndarray:
    sigma = dict((f"gaussian σt={t:g} σyx={s:g}", (t, s, s)) for t, s in GAUSSIANS)[name]
    return ndimage.gaussian_filter(raw.astype(np.float32), sigma, mode="reflect")


def _row(name: str, check: dict[str, Any], held: dict[str, float], extra: str) -> str:
    ratios = [b["ratio"] for b in check["bands"]]
    worst = max(ratios, key=lambda r: abs(r - 1))
    return (f"| {name} | {ratios[0]:.3f} | {ratios[1]:.3f} | {ratios[-1]:.3f} | {worst:.3f} | "
            f"{held.get(name, float('nan')):.4g} |{extra}")


def dataset(work: Path, label: str, raw_path: Path, clean: Path | None,
            truth: Path | None) -> list[str]:
    """The table rows of one recording."""
    work = work / raw_path.stem
    work.mkdir()
    rec = convert(raw_path, work / "rec.zarr", workers=1, progress=False).path
    config = DEMO_TRAINING.model_copy(update={"device": "cpu"})
    t0 = time.perf_counter()
    model = train(rec, work / "run", config=config, progress=False).best
    minutes = (time.perf_counter() - t0) / 60
    bare = _uncalibrated(model)
    raw = tifffile.imread(raw_path)
    outs = {"network, calibrated": denoise_in_memory(model, raw),
            "network, uncalibrated": denoise_in_memory(bare, raw)}
    held_cal = heldout_score(rec, model=model, recording_store=str(rec), device="cpu")
    held_bare = heldout_score(rec, model=bare, recording_store=str(rec), device="cpu")
    held = {r["name"]: r["excess"] for r in held_cal["rows"]}
    held["network, calibrated"] = held.pop("denoised")
    bare_mse = next(r["mse"] for r in held_bare["rows"] if r["name"] == "denoised")
    held["network, uncalibrated"] = bare_mse - min(r["mse"] for r in held_cal["rows"])
    truth_rows: dict[str, dict[str, Any]] = {}
    if clean is not None:
        for name, out in outs.items():
            path = work / f"{name.split(',')[1].strip()}.tif"
            tifffile.imwrite(path, out)
            scores = score(path, clean, raw_path, footprints=truth)
            for row in scores["rows"]:
                truth_rows.setdefault(name if row["name"] == "denoised" else row["name"], row)
        best = max((n for n in truth_rows if n.startswith("gaussian")),
                   key=lambda n: truth_rows[n]["snr_db"])
    else:
        best = min((r for r in held_cal["rows"] if r["name"].startswith("gaussian")),
                   key=lambda r: r["mse"])["name"]
    outs[best] = _gaussian(raw, best)
    outs["raw"] = raw.astype(np.float32)
    rank = [r["name"] for r in held_cal["rows"]].index("denoised") + 1
    lines = [f"\n**{label}** ({raw.shape[0]}×{raw.shape[1]}×{raw.shape[2]}, training "
             f"{minutes:.1f} min; held-out score ranks the calibrated network {rank} of "
             f"{len(held_cal['rows'])}, frames {held_cal['frames'][0]}–"
             f"{held_cal['frames'][1]})\n",
             "| method | dimmest decile | 2nd | brightest | worst | held-out excess |"
             + (" SNR dB | trace r |" if truth_rows else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if truth_rows else "")]
    for name, out in outs.items():
        path = work / "check.tif"
        tifffile.imwrite(path, out)
        check = intensity_bands(path, raw_path)
        extra = ""
        if truth_rows:
            row = truth_rows.get(name)
            extra = (f" {row['snr_db']:.2f} | {row['trace_r_mean']:.3f} |" if row
                     else " | |")
        lines.append(_row(name, check, held, extra))
    return lines


def main() -> None:
    """Print (and with --record, append to RESULTS.md) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, help="a real recording (TIFF) to include")
    parser.add_argument("--cases", nargs="+", default=["somata,1,offset", "somata,1,clipped",
                                                       "dense,1,clipped", "somata,0.3,clipped"])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-intensity-"))
    lines = [f"machine: {machine()}; training: the demo's ({DEMO_TRAINING.features} features, "
             f"{DEMO_TRAINING.epochs}×{DEMO_TRAINING.steps_per_epoch} steps, loss "
             f"{DEMO_TRAINING.loss}); columns: denoised over raw temporal mean by decile of "
             "the raw mean (1 = kept), the worst decile, the held-out score's excess over the "
             "best method (squared sample units, no ground truth)"]
    try:
        if args.real is not None:
            lines += dataset(work, f"real: {args.real.name}", args.real, None, None)
            print("\n".join(lines), flush=True)
        for case in args.cases:
            scene, photons_text, storage = case.split(",")
            photons, clipped = float(photons_text), storage == "clipped"
            sim = SimulationConfig(**{**DEMO_SIMULATION.model_dump(), "photons": photons,
                                      "scene": scene, "subtract_offset": clipped,
                                      "dropouts": 0.005 if clipped else 0.0})
            label = (f"simulation, {scene} scene, {photons:g} photon/px/frame, "
                     + ("offset-subtracted, clipped at zero, line dropouts" if clipped
                        else "with the detector's offset"))
            files = simulate(work / f"sim{len(lines)}", sim)
            lines += dataset(work, label, files.raw, files.clean, files.truth)
            print("\n".join(lines[-8:]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish("Intensities kept: the calibration on real and simulated recordings",
            "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
