"""DVC stage `sweep`: train every combination in params.yaml's `sweep:` grid with the train stage's code.

Keys the grid does not list take their built-in defaults; only `device` comes from the top level.
Writes one row per run and epoch (metrics/sweep.csv and .json), the best run by validation
accuracy (metrics/sweep_best.json) and a TensorBoard folder per run under runs/sweep/.
"""

import argparse
import sys

from fmnist import cli, params
from fmnist.data import load_processed
from fmnist.engine import make_deterministic, resolve_device, to_device, train_run
from fmnist.fileio import atomic_dir, write_json
from fmnist.tracking import RunBuilder, RunManager, run_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", default="metrics/sweep", help="writes <results>.csv and <results>.json")
    parser.add_argument("--best", default="metrics/sweep_best.json")
    parser.add_argument("--logdir", default="runs/sweep", help="TensorBoard root, one folder per run")
    args = parser.parse_args()

    raw = params.load(args.params)
    runs = RunBuilder.get_runs(params.sweep_grid(raw))
    configs = params.sweep_runs(raw, runs)  # every run checked before the first starts
    make_deterministic()
    device = resolve_device(configs[0].device)
    data = load_processed(args.data)
    train, val = (to_device(s, data.mean, data.std, device) for s in (data.train, data.val))

    finals = []
    with atomic_dir(args.logdir) as staging:  # runs/sweep appears whole once every run has finished
        manager = RunManager(log_root=staging)
        for i, (run, p) in enumerate(zip(runs, configs), 1):
            print(f"sweep run {i}/{len(runs)}: {run_name(run)}", file=sys.stderr, flush=True)
            _, metrics = train_run(p, train, val, manager, run=run, progress=sys.stderr.isatty())
            finals.append({"run": i, "name": run_name(run), **metrics, "params": run._asdict()})
    manager.save(args.results)
    write_json(args.best, max(finals, key=lambda f: f["val_accuracy"]))


if __name__ == "__main__":
    cli.run(main)
