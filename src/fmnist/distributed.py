"""Data-parallel training on ``torch.distributed``: the same train stage as one process or as N.

``processes: N`` starts N copies of the stage through torchrun's launcher (or ``torchrun`` across
machines); each trains a DistributedDataParallel replica on its shard of every batch (gloo on the
CPU, NCCL on CUDA); only rank 0 writes outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ParamsError, PipelineError, Terminated, first_line

# A collective that waits longer than this has lost a peer: every process stops instead of hanging.
TIMEOUT = timedelta(minutes=5)
# How long a launched process whose collective failed waits for a stop signal before reporting the failure:
# the launcher signals every process at once, and a peer that has already stopped fails the collective.
STOP_GRACE = 2.0


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank 0 of 1 when not distributed."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (checkpoint, metrics, logs, resume state)."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's part of ``n`` items: contiguous, sizes differing by at most one."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def sum(self, *values: torch.Tensor | float | int) -> list[torch.Tensor]:
        """The sums of ``values`` over every process (float64 on the device of the first tensor)."""
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        if self.size > 1:
            dist.all_reduce(t)
        return list(t)


def under_launcher() -> bool:
    """Whether torchrun (or the launcher :func:`launch` uses) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(processes: int, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up; (this process's World, its device). ``processes`` (params.yaml's)
    must be torchrun's world size: results depend on it, so DVC must see it."""
    if not under_launcher():
        if processes != 1:
            raise PipelineError(f"processes is {processes} but this process was not started by a launcher")
        return World(), device
    size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if size != processes:
        raise ParamsError(f"params.yaml: processes is {processes} but torchrun started {size} processes: "
                          f"set processes: {size}")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return World(rank, size, local_rank), device


@contextlib.contextmanager
def session(world: World) -> Iterator[None]:
    """Run a process's share of the training, then leave the process group; a failed collective (a peer
    died, the timeout passed) becomes one line naming this process, not a traceback from gloo or NCCL."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError and gloo's transport errors are RuntimeErrors
        if world.size == 1:
            raise
        if under_launcher():  # a stop signal on its way ends this process as stopped (stage.run), not failed
            time.sleep(STOP_GRACE)
        raise PipelineError(f"training process {world.rank} of {world.size}: {first_line(e)}") from e
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launch(processes: int) -> None:
    """Run this script again as ``processes`` processes on this machine (torchrun's launcher, standalone).

    A process that fails stops the others and becomes a one-line :class:`PipelineError` naming it; a
    stop signal stops them all as it stops a single process. Each gets its share of the cores.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .runtime import available_cores

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id="fmnist", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its failure report is a page long: ours is a line
    os.environ["OMP_NUM_THREADS"] = str(max(1, available_cores() // processes))  # the processes inherit it
    try:
        elastic_launch(config, sys.executable)(*sys.argv)
    except SignalException as e:  # the launcher's own handler; it has stopped the processes
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise Terminated(e.sigval) from None
    except ChildFailedError as e:
        # the first to fail, not one the launcher then stopped with SIGTERM
        stopped = (-signal.SIGTERM, 128 + signal.SIGTERM)  # killed by it, or ended by stage.run on it
        rank, failure = min(e.failures.items(), key=lambda f: (f[1].exitcode in stopped, f[1].timestamp, f[0]))
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        raise PipelineError(f"training process {rank} of {processes} failed ({how}); the others were stopped"
                            " (its own message, if any, is above)") from None
