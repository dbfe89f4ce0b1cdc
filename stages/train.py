"""DVC stage `train`: train the model chosen in params.yaml; write the checkpoint and TensorBoard logs.

The checkpoint carries the final metrics, the per-epoch history and what decides the bits; the
evaluate stage writes them out where git keeps them. The machine's own record (CPU, threads) goes
to machine.json beside the logs, which no hash covers.
"""

import argparse
import io
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from fmnist import distributed, params, resume, runtime, stage, threadshare
from fmnist.checkpoint import save_checkpoint
from fmnist.data import load_processed
from fmnist.engine import to_device, train_run
from fmnist.fileio import atomic_dir, write_json
from fmnist.tracking import RunManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="checkpoint to write")
    parser.add_argument("--logdir", required=True, help="TensorBoard log folder")
    parser.add_argument("--state", required=True,
                        help="the state after each epoch, to resume from if the run is cut short (removed at the end)")
    args = parser.parse_args()  # outputs have no default: dvc.yaml names every path

    p = params.train_params(params.load(args.params))  # every check before any work
    if p.processes > 1 and not distributed.under_launcher():
        distributed.launch(p.processes)  # this script again, as p.processes data-parallel processes
        return
    device = runtime.configure(p)  # numerics pinned before the first tensor exists
    world, device = distributed.init(p.processes, device)
    with distributed.session(world):
        train_and_write(args, p, device, world)


def train_and_write(args: argparse.Namespace, p, device, world: distributed.World) -> None:
    """Train (as one of ``world``'s processes); rank 0 writes every output."""
    if not world.main:  # the other processes train in silence: their figures are rank 0's
        logging.getLogger("fmnist").setLevel(logging.WARNING)
    data = load_processed(args.data)
    train, val = (to_device(s, data.mean, data.std, device) for s in (data.train, data.val))

    env = runtime.environment(p, device, runtime.available_cores())  # the cores ThreadShare counts below
    state = resume.SavedState(args.state, resume.fingerprint(params.training_values(p), args.data, __file__, env))
    saved = state.load() if world.main else None
    resume_from = saved and saved["run"]
    if world.size > 1:  # the state rank 0 found, for every process
        shared = [resume_from]
        torch.distributed.broadcast_object_list(shared, src=0)
        resume_from = shared[0]

    def after_epoch(run_state: dict) -> None:
        state.save(run=run_state)

    manager = RunManager() if world.main else RunManager(stream=io.StringIO())
    # TensorBoard follows the run live in a hidden staging folder beside runs/train, which takes
    # its place only when training has finished: a failed run leaves no partial log behind (its
    # events so far are in the saved state).
    with threadshare.ThreadShare() as threads, (atomic_dir(args.logdir) if world.main else nullcontext()) as staging:
        model, metrics = train_run(p, train, val, manager, name=Path(args.logdir).name, log_dir=staging,
                                   progress=sys.stderr.isatty() and world.main, threads=threads,
                                   resume=resume_from, on_epoch=after_epoch if world.main else None,
                                   world=world)
        if world.main:
            write_json(staging / "machine.json", runtime.machine(device, threads.cores))
    if not world.main:
        return
    save_checkpoint(args.model, model, p, data.mean, data.std, environment=env, metrics=metrics,
                    history=manager.run_rows())
    state.clear()


if __name__ == "__main__":
    stage.run(main)
