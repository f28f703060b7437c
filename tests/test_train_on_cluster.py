"""Training as one task on a dask worker: the same run as here, and it survives its worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from distributed import Client, LocalCluster

from deepcad_chunked import ConvertConfig, TrainConfig, convert, train
from deepcad_chunked.errors import ConfigError, DeepCADError
from deepcad_chunked.launchers import wait_for_a_worker
from deepcad_chunked.model import Checkpoint
from tests.test_train import TINY, blinking_cells
from tests.tiffs import write_plain


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    folder = tmp_path_factory.mktemp("remote")
    tif = write_plain(folder / "cells.tif", blinking_cells(160, 32, seed=5))
    return convert(tif, folder / "cells.zarr", config=ConvertConfig(chunks=(16, 16, 16)),
                   cluster=client, progress=False).path


def _own_cluster() -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")
    return cluster, Client(cluster)


def test_training_on_a_worker_equals_training_here(tmp_path: Path, store: Path,
                                                   client: Client) -> None:
    config = TrainConfig(**TINY, epochs=2, steps_per_epoch=5)
    here = train(store, tmp_path / "here", config=config, progress=False)
    there = train(store, tmp_path / "there", config=config, cluster=client)
    assert [h["epoch"] for h in there.history] == [1, 2]
    assert there.best.parent == tmp_path / "there"
    want, got = Checkpoint.load(here.last).model_state, Checkpoint.load(there.last).model_state
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    # a run directory that holds a run is refused on the worker as it is here, in one line
    with pytest.raises(DeepCADError, match="already holds a training run"):
        train(store, tmp_path / "there", config=config, cluster=client)


def test_a_killed_worker_resumes_training_from_its_last_epoch(tmp_path: Path,
                                                             store: Path) -> None:
    config = TrainConfig(**TINY, epochs=6, steps_per_epoch=40)
    cluster, own = _own_cluster()
    try:
        reference = train(store, tmp_path / "reference", config=config, cluster=own)
        run = tmp_path / "run"
        pid = next(iter(own.run(os.getpid).values()))
        seen: dict[str, list] = {}

        def kill_after_first_epoch() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if (run / "epoch_0001.pt").exists() and (run / "log.json").exists():
                    seen["history"] = json.loads((run / "log.json").read_text())
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
        killer.start()
        result = train(store, run, config=config, cluster=own)
        killer.join(timeout=5)
    finally:
        own.close()
        cluster.close()
    assert "history" in seen and len(seen["history"]) < config.epochs  # killed mid-run
    assert [h["epoch"] for h in result.history] == list(range(1, config.epochs + 1))
    # the restarted task resumed: the epochs before the kill are kept, not trained again
    assert result.history[0] == seen["history"][0]
    want = Checkpoint.load(reference.last).model_state
    got = Checkpoint.load(result.last).model_state
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_no_worker_is_a_one_line_error() -> None:
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as lc, \
            Client(lc) as empty:
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"no dask worker joined .* within 1 s"):
            wait_for_a_worker(empty, timeout=1)
        assert time.monotonic() - started < 10
