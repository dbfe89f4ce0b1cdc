"""DVC stage `train`: train the model chosen in params.yaml; write the checkpoint, metrics, history, environment and TensorBoard logs."""

import argparse
import sys
from pathlib import Path

from fmnist import cli, params, runtime
from fmnist.checkpoint import save_checkpoint
from fmnist.data import load_processed
from fmnist.engine import to_device, train_run
from fmnist.fileio import atomic_dir, atomic_path, write_json
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
    args = parser.parse_args()

    p = params.train_params(params.load(args.params))  # every check before any work
    device = runtime.configure(p)  # numerics pinned before the first tensor exists
    data = load_processed(args.data)
    train, val = (to_device(s, data.mean, data.std, device) for s in (data.train, data.val))

    manager = RunManager()
    # TensorBoard follows the run live in a hidden staging folder beside runs/train, which takes
    # its place only when training has finished: a failed run leaves no partial log behind.
    with runtime.ThreadShare() as threads, atomic_dir(args.logdir) as staging:
        model, metrics = train_run(p, train, val, manager, name=Path(args.logdir).name, log_dir=staging,
                                   progress=sys.stderr.isatty(), threads=threads)

    env = runtime.environment(p, device, threads.cores)
    save_checkpoint(args.model, model, p, data.mean, data.std, environment=env)
    write_json(args.metrics, metrics)
    write_json(args.env, env)
    with atomic_path(args.history) as tmp:
        manager.dataframe()[["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]].to_csv(tmp, index=False)


if __name__ == "__main__":
    cli.run(main)
