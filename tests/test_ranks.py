"""Data-parallel training on the CPU: two gloo processes train the weights of one process with
the same batch; a killed process stops the run in one line, and it resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import torch
from distributed import Client

from deepcad_chunked import TrainConfig, train
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.training.processes import loopback_interface
from deepcad_chunked.training.ranks import Rank, RankSampler
from tests.conftest import assert_clean_error, run_cli, start_cli, wait_until
from tests.test_train import cells_store

TINY = {"patch": (8, 16, 16), "features": 4, "batch_size": 4, "lr": 1e-3, "workers": 0,
        "device": "cpu", "val_tiles": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    return cells_store(tmp_path_factory.mktemp("ranks"), client)


def test_ranks_share_every_batch_in_order() -> None:
    shares = [list(RankSampler(3, 5, 4, Rank(r, 2))) for r in range(2)]
    assert shares == [[12, 13, 16, 17], [14, 15, 18, 19]]
    assert list(RankSampler(3, 5, 4, Rank(0, 1))) == list(range(12, 20))
    assert len(RankSampler(3, 5, 4, Rank(1, 2))) == 4


def test_two_processes_train_the_weights_of_one_with_the_same_batch(tmp_path: Path,
                                                                    store: Path) -> None:
    config = {**TINY, "epochs": 2, "steps_per_epoch": 5}
    one = train(store, tmp_path / "one", config=TrainConfig(**config), progress=False)
    two = train(store, tmp_path / "two", config=TrainConfig(**config, devices=2),
                progress=False)
    want, got = Checkpoint.load(one.last), Checkpoint.load(two.last)
    assert got.epoch == 2 and got.step == want.step == 10
    changed = 0.0
    for name, w in want.model_state.items():
        g = got.model_state[name]
        assert torch.allclose(w, g, rtol=1e-4, atol=1e-6), name
        changed = max(changed, float((w - Checkpoint.load(one.run_dir / "epoch_0001.pt")
                                      .model_state[name]).abs().max()))
    assert changed > 1e-4  # the second epoch moved the weights: the comparison means something
    # the logged training loss is the mean over all tiles of a step, as in one process
    assert [round(h["train_loss"], 5) for h in one.history] == \
        [round(h["train_loss"], 5) for h in two.history]
    assert not list(Path(tempfile.gettempdir()).glob("deepcad-ranks-*"))  # rendezvous gone


def _args(store: Path, run: Path) -> list[str]:
    return ["train", str(store), "-o", str(run), "--patch", "8,16,16", "--features", "4",
            "--batch-size", "4", "--lr", "1e-3", "--epochs", "4", "--steps-per-epoch", "30",
            "--workers", "0", "--device", "cpu", "--devices", "2", "--no-progress"]


def _ranks(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in
            " ".join(p.cmdline())]


def test_a_killed_process_stops_the_run_in_one_line_and_it_resumes_exactly(
        tmp_path: Path, store: Path) -> None:
    reference = tmp_path / "reference"
    done = run_cli(*_args(store, reference))
    assert done.returncode == 0, done.stderr

    run = tmp_path / "killed"
    proc = start_cli(*_args(store, run))
    wait_until((run / "epoch_0001.pt").exists, proc)
    ranks = _ranks(proc)
    assert len(ranks) == 2, ranks
    ranks[1].send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "was killed by SIGKILL" in stderr and "--resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)
    assert not (run / "epoch_0004.pt").exists()

    result = run_cli(*_args(store, run), "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    want = Checkpoint.load(reference / "last.pt").model_state
    got = Checkpoint.load(run / "last.pt").model_state
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_a_batch_the_devices_cannot_share_and_devices_on_a_cluster_are_refused(
        tmp_path: Path, store: Path) -> None:
    odd = run_cli("train", str(store), "-o", str(tmp_path / "r"), "--batch-size", "3",
                  "--devices", "2", "--no-progress")
    assert_clean_error(odd, "multiple of --devices")
    clustered = run_cli("train", str(store), "-o", str(tmp_path / "c"), "--devices", "2",
                        "--patch", "8,16,16",
                        "--cluster", "local", "--no-progress")
    assert_clean_error(clustered, "--devices")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("*.pt"))


def test_an_error_of_the_main_process_alone_is_said_as_it_is(tmp_path: Path,
                                                             store: Path) -> None:
    """Rank 0 refuses a run directory that holds a run; rank 1, waiting for it to join, is
    stopped, and the command says rank 0's reason."""
    run = tmp_path / "run"
    args = ["train", str(store), "-o", str(run), "--features", "2", "--patch", "8,16,16",
            "--epochs", "1", "--steps-per-epoch", "2", "--workers", "0", "--device", "cpu",
            "--devices", "2", "--no-progress"]
    assert run_cli(*args).returncode == 0
    before = (run / "last.pt").read_bytes()
    again = run_cli(*args)
    assert_clean_error(again, "already holds a training run", "--resume")
    assert (run / "last.pt").read_bytes() == before


def _launch(node: int, port: int, store: Path, run: Path, *extra: str) -> subprocess.Popen[str]:
    """One of two "nodes" of a ``torchrun`` launch, both on this machine, meeting on loopback:
    each runs one process of the run (``train`` with no ``--devices``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": loopback_interface(),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
         str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
         str(port), "-m", "deepcad_chunked", "train", str(store), "-o", str(run),
         "--patch", "8,16,16", "--features", "4", "--batch-size", "4", "--lr", "1e-3",
         "--epochs", "2", "--steps-per-epoch", "5", "--workers", "0", "--device", "cpu",
         "--no-progress", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_torchrun_launch_over_two_nodes_trains_the_weights_of_one_process(
        tmp_path: Path, store: Path) -> None:
    """Processes started by a launcher (here torchrun as two nodes on this machine) each take
    one share of the batch; rank 0 alone holds and writes the run directory."""
    config = {**TINY, "epochs": 2, "steps_per_epoch": 5}
    one = train(store, tmp_path / "one", config=TrainConfig(**config), progress=False)
    run, port = tmp_path / "launched", _free_port()
    nodes = [_launch(i, port, store, run) for i in range(2)]
    outputs = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert all("Traceback" not in out for out in outputs), outputs
    assert "epoch 2/2" in outputs[0] and "epoch" not in outputs[1], outputs  # one voice
    want, got = Checkpoint.load(one.last), Checkpoint.load(run / "last.pt")
    assert got.epoch == 2 and got.step == want.step == 10
    for name, w in want.model_state.items():
        assert torch.allclose(w, got.model_state[name], rtol=1e-4, atol=1e-6), name
    assert [round(h["train_loss"], 5) for h in one.history] == \
        [round(h["train_loss"], 5) for h in json.loads((run / "log.json").read_text())]


def test_a_launch_whose_batch_the_processes_cannot_share_is_refused(tmp_path: Path,
                                                                    store: Path) -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    odd = run_cli("train", str(store), "-o", str(tmp_path / "r"), "--batch-size", "3",
                  "--patch", "8,16,16", "--no-progress", env=env)
    assert_clean_error(odd, "multiple of 2")
    both = run_cli("train", str(store), "-o", str(tmp_path / "r"), "--devices", "2",
                   "--patch", "8,16,16", "--no-progress", env=env)
    assert_clean_error(both, "rank 1 of 2", "--devices")
    bad = run_cli("train", str(store), "-o", str(tmp_path / "r"), "--patch", "8,16,16",
                  "--no-progress", env={**env, "RANK": "two"})
    assert_clean_error(bad, "whole numbers")
    assert not (tmp_path / "r").exists()


def test_a_launched_process_killed_stops_the_others_in_one_line_and_the_run_resumes(
        tmp_path: Path, store: Path) -> None:
    run, port = tmp_path / "launched", _free_port()
    longer = ("--epochs", "3", "--steps-per-epoch", "25")
    nodes = [_launch(i, port, store, run, *longer) for i in range(2)]
    wait_until((run / "epoch_0001.pt").exists, nodes[0])
    child = psutil.Process(nodes[1].pid).children()
    assert len(child) == 1, child
    child[0].send_signal(signal.SIGKILL)
    outputs = [node.communicate(timeout=120)[1] for node in nodes]
    assert nodes[0].returncode != 0
    ours = [ln for ln in outputs[0].splitlines() if ln.startswith("deepcad-chunked: error")]
    assert len(ours) == 1 and "process 0 of 2 lost the others" in ours[0], outputs[0]
    assert "--resume" in ours[0] and "pair.cc" not in ours[0], ours
    assert not (run / "epoch_0003.pt").exists()

    port = _free_port()
    nodes = [_launch(i, port, store, run, *longer, "--resume") for i in range(2)]
    outputs = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "resuming" in outputs[0]
    assert Checkpoint.load(run / "last.pt").epoch == 3
