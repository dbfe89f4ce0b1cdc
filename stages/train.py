"""DVC stage `train`: train the model chosen in params.yaml; write the checkpoint, metrics, history, environment and TensorBoard logs."""

import argparse
import io
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from fmnist import cli, distributed, params, resume, runtime
from fmnist.checkpoint import save_checkpoint
from fmnist.data import load_processed
from fmnist.engine import to_device, train_run
from fmnist.fileio import atomic_dir, write_csv, write_json
from fmnist.tracking import RunManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/model.pt", help="checkpoint to write")
    parser.add_argument("--metrics", default="metrics/train.json")
    parser.add_argument("--history", default="metrics/train_history.csv", help="per-epoch DVC plot data")
    parser.add_argument("--env", default="metrics/train_env.json", help="what the run computed on")
    parser.add_argument("--logdir", default="runs/train", help="TensorBoard log folder")
    parser.add_argument("--state", default=".resume/train.pt",
                        help="the state after each epoch, to resume from if the run is cut short (removed at the end)")
    args = parser.parse_args()

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

    state = resume.SavedState(args.state, resume.fingerprint(params.training_values(p), args.data, __file__))
    saved = state.load() if world.main else None
    resume_from = saved and saved["run"]
    if world.size > 1:  # the state rank 0 found, for every process
        shared = [resume_from]
        torch.distributed.broadcast_object_list(shared, src=0)
        resume_from = shared[0]

    def after_epoch(run_state: dict) -> None:
        write_history(args.history, run_state["rows"])  # dvc plots show the run in progress
        state.save(run=run_state)

    manager = RunManager() if world.main else RunManager(stream=io.StringIO())
    # TensorBoard follows the run live in a hidden staging folder beside runs/train, which takes
    # its place only when training has finished: a failed run leaves no partial log behind (its
    # events so far are in the saved state).
    with runtime.ThreadShare() as threads, (atomic_dir(args.logdir) if world.main else nullcontext()) as staging:
        model, metrics = train_run(p, train, val, manager, name=Path(args.logdir).name, log_dir=staging,
                                   progress=sys.stderr.isatty() and world.main, threads=threads,
                                   resume=resume_from, on_epoch=after_epoch if world.main else None,
                                   world=world)
    if not world.main:
        return
    env = runtime.environment(p, device, threads.cores)
    save_checkpoint(args.model, model, p, data.mean, data.std, environment=env)
    write_json(args.metrics, metrics)
    write_json(args.env, env)
    write_history(args.history, manager.run_rows())
    state.clear()


def write_history(path: str, rows: list[dict]) -> None:
    """The per-epoch DVC plot data: epoch, train and validation loss and accuracy."""
    write_csv(path, rows, ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"])


if __name__ == "__main__":
    cli.run(main)
