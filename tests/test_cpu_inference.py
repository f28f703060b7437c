"""How a local cluster runs the network on the CPU: one process on every core, whose memory
is kept from one forward pass to the next."""

from __future__ import annotations

import os
import resource
from typing import Any

import pytest

from deepcad_chunked.cluster import (
    WORKER_MALLOC_ENV,
    connect,
    cpu_cores,
    inference_workers,
)


def _passes() -> dict[str, Any]:
    """Equal forward passes in this worker: threads, and the page faults of each.

    The input is large enough for activations over glibc's largest mapping threshold (32 MiB).
    """
    import torch

    from deepcad_chunked.infer.lean import lean_forward
    from deepcad_chunked.model.unet3d import UNet3D

    model = UNet3D(features=4).eval()
    x = torch.randn(1, 1, 64, 192, 192)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        lean_forward(model, x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"threads": torch.get_num_threads(), "faults": faults,
            "omp": os.environ.get("OMP_NUM_THREADS")}


def test_inference_runs_one_process_on_every_core() -> None:
    workers, env = inference_workers(None)
    assert workers == 1 and env["OMP_NUM_THREADS"] == cpu_cores()
    two, env2 = inference_workers(2)
    assert two == 2 and env2["OMP_NUM_THREADS"] == max(1, cpu_cores() // 2)


@pytest.mark.parametrize("inference", [True, False])
def test_an_inference_worker_reuses_the_memory_of_its_last_pass(inference: bool) -> None:
    workers, env = inference_workers(None)
    with connect("local", workers=workers,
                 worker_env=env if inference else WORKER_MALLOC_ENV) as client:
        (got,) = client.run(_passes).values()
    first, *_ = got["faults"]
    last = min(got["faults"][-3:])  # a busy machine may take one pass's pages away
    assert first > 20000  # the pass touches hundreds of MiB
    if inference:
        assert got["threads"] == cpu_cores() and got["omp"] == str(cpu_cores())
        # once the heap has the shape of a pass (a few passes), a pass finds all its memory
        # there: no fresh pages to fault in and zero
        assert last < 0.05 * first, got["faults"]
    else:
        # the allocator of other workers maps and unmaps every large activation
        assert last > 0.5 * first, got["faults"]
