"""The training loop: Adam on 0.5·L1 + 0.5·L2 between denoised input frames and target frames.

Checkpoints after every epoch (``epoch_NNNN.pt``, ``last.pt``, and ``best.pt`` for the lowest
validation loss), each with the network's intensity calibration
(:mod:`deepcad_chunked.training.calibrate`) unless ``TrainConfig.calibrate`` is off; losses
logged to ``log.csv`` and ``log.json``. ``resume=True`` continues
from ``last.pt``: weights, optimiser, epoch, and the sample counter that drives the stateless
tile sampler, so a killed and resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from deepcad_chunked.config import TrainConfig
from deepcad_chunked.errors import ConfigError, DeepCADError, TrainingError
from deepcad_chunked.interrupt import check as check_interrupt
from deepcad_chunked.model.calibration import Calibration
from deepcad_chunked.model.checkpoint import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.progress import progress_bar
from deepcad_chunked.store.location import write_atomic
from deepcad_chunked.store.pins import StorePin
from deepcad_chunked.store.recording import Recording
from deepcad_chunked.training.calibrate import calibrate
from deepcad_chunked.training.dataset import Normalization, TilePairDataset, make_pairs
from deepcad_chunked.training.ranks import Rank, RankSampler, agree, mean_over_ranks
from deepcad_chunked.training.tiles import draw, split_regions

log = logging.getLogger(__name__)

#: Options that must match for ``resume`` to continue a run.
_RESUME_KEYS = ("patch", "features", "batch_size", "seed", "val_fraction", "val_tiles",
                "steps_per_epoch", "tiles_per_window", "schedule", "warmup", "loss",
                "average", "bypass")
#: What checkpoints written before an option existed were trained with.
_OLD_DEFAULTS = {"schedule": "constant", "warmup": 0.05, "loss": "l1+l2", "average": 0.0,
                 "bypass": None}


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its files, and its per-epoch losses."""

    run_dir: Path
    best: Path
    last: Path
    history: list[dict[str, float]]


def loss_fn(output: torch.Tensor, target: torch.Tensor, kind: str = "l1+l2") -> torch.Tensor:
    """DeepCAD's loss, the mean of the L1 and the L2 (mean squared) errors; or ``"l2"`` alone."""
    mse = torch.nn.functional.mse_loss(output, target)
    if kind == "l2":
        return mse
    return 0.5 * torch.nn.functional.l1_loss(output, target) + 0.5 * mse


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``, as a factor of ``lr``.

    ``cosine``: a linear rise over the first ``warmup·total`` steps, then a half cosine from 1
    down to 0 at the last step. ``constant``: 1.
    """
    if schedule == "constant":
        return 1.0
    ramp = int(warmup * total)
    if step < ramp:
        return (step + 1) / (ramp + 1)
    span = max(1, total - ramp)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - ramp, span) / span))


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pooled_normalization(recordings: Sequence[Recording]) -> Normalization:
    """Mean and standard deviation over all samples of all recordings."""
    counts = np.array([r.statistics["count"] for r in recordings], dtype=np.float64)
    means = np.array([r.statistics["mean"] for r in recordings])
    stds = np.array([r.statistics["std"] for r in recordings])
    mean = float(np.sum(counts * means) / counts.sum())
    var = float(np.sum(counts * (stds**2 + (means - mean) ** 2)) / counts.sum())
    return Normalization(mean=mean, std=math.sqrt(var) if var > 0 else 1.0)


def check_sizes(recordings: Sequence[Recording], config: TrainConfig) -> None:
    tt, ty, tx = config.tile
    for rec in recordings:
        rec.require_finite()
        frames, height, width = rec.shape[0], rec.shape[-2], rec.shape[-1]
        if frames < tt or height < ty or width < tx:
            fit = (frames // 2 // 8 * 8, height // 8 * 8, width // 8 * 8)
            hint = (f"use --patch {','.join(map(str, fit))} or smaller"
                    if min(fit) >= 8 else "it is too small to train on")
            raise ConfigError(
                f"{rec.path} has {frames} frames of {height}×{width} pixels, but --patch "
                f"{','.join(map(str, config.patch))} needs tiles of {tt} frames of {ty}×{tx}; "
                + hint)


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DeepCADError(f"cannot write the run directory {run_dir}: "
                           f"{exc.strerror or exc}") from None
    if not resume and _newest_checkpoint(run_dir) is not None:
        raise DeepCADError(f"{run_dir} already holds a training run; pass --resume to continue "
                           "it or choose another output directory")


#: A loss above this (in normalised units, where a useless constant output scores about 1)
#: means the run has diverged even while it is still finite.
DIVERGED_LOSS = 1e9


def _require_finite(value: float, epoch: int, where: str, lr: float) -> None:
    """Stop a run whose loss (or weights) stopped being finite, or exploded: it diverged.

    Raises
    ------
    TrainingError
        Naming the epoch and what to do; no checkpoint of the diverged weights is written.
    """
    if math.isfinite(value) and value < DIVERGED_LOSS:
        return
    earlier = (f"--resume continues from epoch {epoch - 1}'s checkpoint" if epoch > 1
               else "no checkpoint was written")
    raise TrainingError(f"training diverged in epoch {epoch} ({where}: the loss is {value:.3g}); "
                        f"lower --lr (it is {lr:g}) and train again ({earlier})")


class WeightAverage:
    """An exponential moving average of a network's weights (buffers are copied as they are).

    The decay of step ``n`` is ``min(decay, (1 + n) / (10 + n))``: early, when the weights
    move fast, the average follows them closely.
    """

    def __init__(self, model: UNet3D, decay: float) -> None:
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: UNet3D, step: int) -> None:
        """Fold in the weights after optimiser step ``step`` (0-based, over the whole run)."""
        keep = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()),
                             [p.detach() for p in model.parameters()], 1.0 - keep)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)


def _loader_worker_init(worker_id: int) -> None:
    """Tile loaders leave Ctrl-C and SIGTERM to the training process, which stops them."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _next_batch(batches: Any) -> Any:
    """The next batch; a loader that died because the command is being stopped is an
    interruption, not an error, and an error of the user's data raised in a loader (a damaged
    store) is its own one line, not the loader's traceback that PyTorch wraps it in."""
    try:
        return next(batches)
    except DeepCADError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) > 1 and "Traceback" in lines[1]:
            cls = type(exc)
            raise cls(lines[-1].removeprefix(f"{cls.__module__}.{cls.__name__}: ")) from None
        raise
    except RuntimeError:
        check_interrupt()
        raise


def _stop_loaders(batches: Any) -> None:
    """End a loader's worker processes now (they ignore SIGTERM, so a run that ends in an
    error while its iterator is still referenced would wait for them at exit)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _publish(checkpoint: Path, name: Path) -> None:
    """Copy an epoch's checkpoint to ``best.pt`` or ``last.pt`` atomically."""
    tmp = name.with_name(f".{name.name}.{os.getpid()}.tmp")
    shutil.copyfile(checkpoint, tmp)
    os.replace(tmp, name)


def _newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the last finished epoch.

    Each epoch's file is written (atomically) before ``last.pt`` is updated from it, so a run
    killed between the two has a newer epoch file than ``last.pt``.
    """
    epochs = sorted(run_dir.glob("epoch_[0-9][0-9][0-9][0-9].pt"))
    if epochs:
        return epochs[-1]
    return run_dir / "last.pt" if (run_dir / "last.pt").exists() else None


def _write_logs(run_dir: Path, history: list[dict[str, float]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    for name, content in (("log.csv", text.getvalue()), ("log.json", json.dumps(history,
                                                                                  indent=1))):
        write_atomic(run_dir / name, content.encode())


def _validate(model: UNet3D, val_set: TilePairDataset, draws: list, device: torch.device,
              amp: bool, loss: str) -> float:
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for d in draws:
            inp, tgt = val_set.pair(d)
            out = model(inp[None].to(device))
            losses.append(float(loss_fn(out.float(), tgt[None].to(device), loss)))
    model.train()
    return float(np.mean(losses))


@dataclass(frozen=True)
class _Plan:
    """What a run trains on and how long: regions, steps, the record checkpoints carry."""

    stores: list[str]
    norm: Normalization
    train_regions: list
    val_regions: list
    steps: int
    record: dict[str, Any]


def _plan(recordings: Sequence[Recording], config: TrainConfig) -> _Plan:
    stores = [str(r.path.absolute()) for r in recordings]
    norm = pooled_normalization(recordings)
    tile = config.tile
    train_regions, val_regions = split_regions([r.shape for r in recordings], tile,
                                               config.val_fraction)
    if config.steps_per_epoch:
        steps = config.steps_per_epoch
    else:
        frames = sum(reg.t[1] - reg.t[0] for reg in train_regions)
        area = sum((reg.y[1] - reg.y[0]) * (reg.x[1] - reg.x[0]) for reg in train_regions)
        steps = max(1, math.ceil(frames * area / len(train_regions)
                                 / math.prod(tile) / config.batch_size))
    record = {**config.model_dump(mode="json"), "steps_per_epoch": steps, "data": stores,
              "normalization": norm.as_dict()}
    return _Plan(stores, norm, train_regions, val_regions, steps, record)


@dataclass
class _State:
    """The network, its optimiser and average, and the epochs done so far."""

    model: UNet3D
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    average: WeightAverage | None
    start_epoch: int
    history: list[dict[str, float]]
    best: float


def _start(run_dir: Path, config: TrainConfig, record: dict[str, Any], device: torch.device,
           resume: bool, main: bool = True) -> _State:
    """A new network, or the newest checkpoint's when resuming a run made the same way."""
    torch.manual_seed(config.seed)
    model = UNet3D(features=config.features, bypass=config.bypass).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 autocast needs no scaling
    start_epoch, history, best = 0, [], math.inf
    newest = _newest_checkpoint(run_dir) if resume else None
    if newest is not None:
        ckpt = Checkpoint.load(newest, map_location=device)
        trained = {k: ckpt.config.get(k, _OLD_DEFAULTS.get(k))
                   for k in (*_RESUME_KEYS, "data", "normalization")}
        changed = [k for k, v in trained.items() if v != record[k]]
        if changed:
            was = trained["bypass"]
            kernel = "none" if was is None else ",".join(map(str, was))
            hint = f" (it was trained with --bypass {kernel})" if "bypass" in changed else ""
            raise DeepCADError(f"cannot resume {run_dir}: its checkpoint was trained with "
                               f"other {', '.join(changed)}{hint}")
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.optimizer_state)
        start_epoch, history = ckpt.epoch, ckpt.history
        best = min((h["val_loss"] for h in history), default=math.inf)
        if newest.name != "last.pt" and main:  # killed before last.pt (and best.pt) caught up
            _publish(newest, run_dir / "last.pt")
            if history and history[-1]["val_loss"] == best:
                _publish(newest, run_dir / "best.pt")
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    elif resume:
        log.info("nothing to resume in %s; starting a new run", run_dir)
    schedule = _schedule(optimizer, config, record["steps_per_epoch"], start_epoch)
    average = None
    if config.average:
        average = WeightAverage(model, config.average)
        if newest is not None:  # the checkpoint holds the average
            average.model.load_state_dict(ckpt.model_state)
            model.load_state_dict(ckpt.live_state)
    return _State(model, optimizer, schedule, scaler, average, start_epoch, history, best)


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int,
              start_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of every optimiser step (:func:`lr_factor` of ``config.lr``), set
    for the first step of ``start_epoch``: the schedule is a pure function of the step, so a
    resumed run continues it exactly."""
    total = config.epochs * steps
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, config.schedule, config.warmup),
        last_epoch=start_epoch * steps - 1)


def _steps(state: _State, batches: Any, epoch: int, plan: _Plan, config: TrainConfig,
           device: torch.device, bar: Any, network: torch.nn.Module,
           rank: Rank | None) -> float:
    """One epoch's optimiser steps; the summed training loss (over all ranks' tiles).

    ``network`` is ``state.model``, or its ``DistributedDataParallel`` wrapper in a
    data-parallel run, which averages the ranks' gradients in ``backward``."""
    amp = config.amp and device.type == "cuda"
    model, optimizer, steps, total = state.model, state.optimizer, plan.steps, 0.0
    for step in range(steps):
        check_interrupt()
        inp, tgt = make_pairs(_next_batch(batches).to(device, non_blocking=True), plan.norm)
        if epoch * steps + step > state.schedule.last_epoch:
            state.schedule.step()  # the rate of this step (checkpoints hold the last one used)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(network(inp).float(), tgt, config.loss)
        value = mean_over_ranks(float(loss.detach()), rank)  # every rank sees a divergence
        _require_finite(value, epoch + 1, f"step {step + 1}", config.lr)
        state.scaler.scale(loss).backward()
        state.scaler.step(optimizer)
        state.scaler.update()
        if state.average is not None:
            state.average.update(model, epoch * steps + step)
        total += value
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / (step + 1):.4g}", refresh=False)
    return total


def _save_epoch(state: _State, run_dir: Path, epoch: int, train_loss: float, val: float,
                seconds: float, plan: _Plan, config: TrainConfig,
                calibration: Calibration | None) -> None:
    """Record the epoch, write its checkpoint and publish it as last (and best) one."""
    judged = state.average.model if state.average is not None else state.model
    state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val,
                          "seconds": seconds})
    live = state.model.state_dict() if state.average is not None else {}
    norm: dict[str, Any] = dict(plan.norm.as_dict())
    if calibration is not None:
        norm["calibration"] = calibration.as_dict()
    ckpt = Checkpoint(model_state=judged.state_dict(), features=config.features,
                      live_state=live, normalization=norm, config=plan.record,
                      epoch=epoch + 1, step=(epoch + 1) * plan.steps,
                      optimizer_state=state.optimizer.state_dict(),
                      scaler_state=state.scaler.state_dict(), history=state.history)
    name = run_dir / f"epoch_{epoch + 1:04d}.pt"
    ckpt.save(name)
    if val < state.best:
        state.best = val
        _publish(name, run_dir / "best.pt")
    _publish(name, run_dir / "last.pt")
    _write_logs(run_dir, state.history)
    log.info("epoch %d/%d: train loss %.5g, validation loss %.5g%s", epoch + 1,
             config.epochs, train_loss, val, " (best)" if val == state.best else "")


def _end_epoch(state: _State, run_dir: Path, epoch: int, train_loss: float, started: float,
               plan: _Plan, config: TrainConfig, recordings: Sequence[Recording],
               val_set: TilePairDataset, val_draws: list, device: torch.device,
               pins: list[StorePin]) -> None:
    """Validate, calibrate and write the epoch's checkpoint (rank 0's part of an epoch)."""
    amp = config.amp and device.type == "cuda"
    judged = state.average.model if state.average is not None else state.model
    val = _validate(judged, val_set, val_draws, device, amp, config.loss)
    _require_finite(val, epoch + 1, "validation", config.lr)
    if not all(bool(torch.isfinite(p).all()) for p in judged.parameters()):
        _require_finite(math.nan, epoch + 1, "the weights", config.lr)
    calibration = (calibrate(judged, plan.norm, recordings, plan.val_regions, device)
                   if config.calibrate else None)
    for pin in pins:  # the recordings are still the ones training started on
        pin.verify()
    _save_epoch(state, run_dir, epoch, train_loss, val, time.perf_counter() - started, plan,
                config, calibration)


def fit(recordings: Sequence[Recording], run_dir: Path, *, config: TrainConfig,
        resume: bool = False, progress: bool | None = None,
        rank: Rank | None = None) -> TrainResult:
    """Train in this process on ``recordings`` (opened, checked, with statistics), writing
    checkpoints and logs into ``run_dir``, whose lock the caller holds.

    Parameters
    ----------
    recordings : sequence of Recording
    run_dir : Path
    config : TrainConfig
    resume : bool
        Continue from the newest checkpoint in ``run_dir``.
    progress : bool, optional
        Progress bar; default: when standard error is a terminal.
    rank : Rank, optional
        This process's place in a data-parallel run whose ``torch.distributed`` group it has
        joined (:func:`~deepcad_chunked.training.processes.fit_ranks`): it trains on its share of
        every batch, and only rank 0 validates and writes checkpoints. None: alone.

    Returns
    -------
    TrainResult

    Raises
    ------
    DeepCADError
        A ``resume`` whose checkpoint was made with other options or data.
    TrainingError
        The loss stopped being finite (training diverged).
    """
    main = rank is None or rank.main
    if main:
        _prepare_run_dir(run_dir, resume)
    pins = [StorePin(r.path) for r in recordings]
    plan = _plan(recordings, config)
    device = pick_device(config.device)
    if rank is not None and device.type == "cuda":
        device = torch.device("cuda", rank.device)
    state = _start(run_dir, config, plan.record, device, resume, main)
    network: torch.nn.Module = state.model
    if rank is not None and rank.size > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None)
    tile, steps = config.tile, plan.steps
    chunks = [(r.chunks[0], r.chunks[-2], r.chunks[-1]) for r in recordings]
    arrays = [r.array_ref for r in recordings]
    train_set = TilePairDataset(arrays, plan.train_regions, tile, config.seed, plan.norm,
                                tiles_per_window=config.tiles_per_window, chunks=chunks)
    val_set = TilePairDataset(arrays, plan.val_regions, tile, config.seed, plan.norm,
                              augment=False)
    val_draws = [draw(config.seed + 1, i, plan.val_regions, tile, augment=False)
                 for i in range(config.val_tiles)]
    sampler = RankSampler(state.start_epoch * steps, config.epochs * steps, config.batch_size,
                          rank or Rank(0, 1))
    loader = DataLoader(train_set, batch_size=sampler.share, sampler=sampler,
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if config.workers else None,
                        worker_init_fn=_loader_worker_init)
    log.info("training %d-feature network on %d recording(s), tiles %s, %d steps × %d epochs "
             "on %s", config.features, len(plan.stores), tile, steps, config.epochs, device)
    bar = progress_bar(config.epochs * steps, initial=state.start_epoch * steps, unit="step",
                       desc="train", progress=progress)
    batches = iter(loader)
    state.model.train()
    try:
        for epoch in range(state.start_epoch, config.epochs):
            started = time.perf_counter()
            total = _steps(state, batches, epoch, plan, config, device, bar, network, rank)
            failure = None
            if main:
                try:
                    _end_epoch(state, run_dir, epoch, total / steps, started, plan, config,
                               recordings, val_set, val_draws, device, pins)
                except BaseException as exc:  # the other ranks are told, then it is raised
                    failure = exc
            agree(failure, rank)
    finally:
        bar.close()
        _stop_loaders(batches)
        del batches
    return TrainResult(run_dir, run_dir / "best.pt", run_dir / "last.pt", state.history)
