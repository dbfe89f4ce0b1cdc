"""DVC stage `sweep`: train every combination in params.yaml's `sweep:` grid with the train stage's code.

Keys the grid does not list take their built-in defaults; device, cpu_kernel and numerics come
from the top level. Writes one row per run and epoch (metrics/sweep.csv, without timings, so that
git sees only results), the best run by validation accuracy (metrics/sweep_best.json), and a
TensorBoard folder per run under runs/sweep/ beside the seed's full RunManager table, durations
included (runs/sweep/runs.csv and .json, which .dvcignore keeps out of dvc.lock).
"""

import argparse
import sys

from fmnist import cli, params, runtime
from fmnist.data import load_processed
from fmnist.engine import to_device, train_run
from fmnist.fileio import atomic_dir, atomic_path, write_json
from fmnist.tracking import TIMINGS, RunBuilder, RunManager, run_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", default="metrics/sweep.csv", help="one row per run and epoch, no timings")
    parser.add_argument("--best", default="metrics/sweep_best.json")
    parser.add_argument("--env", default="metrics/sweep_env.json", help="what the runs computed on")
    parser.add_argument("--logdir", default="runs/sweep", help="TensorBoard root, one folder per run, and runs.csv")
    args = parser.parse_args()

    raw = params.load(args.params)
    runs = RunBuilder.get_runs(params.sweep_grid(raw))
    configs = params.sweep_runs(raw, runs)  # every run checked before the first starts
    device = runtime.configure(configs[0])  # the runtime keys are the top level's, the same for every run
    data = load_processed(args.data)
    train, val = (to_device(s, data.mean, data.std, device) for s in (data.train, data.val))

    finals = []
    with runtime.ThreadShare() as threads, atomic_dir(args.logdir) as staging:  # runs/sweep appears whole at the end
        manager = RunManager(log_root=staging)
        for i, (run, p) in enumerate(zip(runs, configs), 1):
            print(f"sweep run {i}/{len(runs)}: {run_name(run)}", file=sys.stderr, flush=True)
            _, metrics = train_run(p, train, val, manager, run=run, progress=sys.stderr.isatty(), threads=threads)
            finals.append({"run": i, "name": run_name(run), **metrics, "params": run._asdict()})
        manager.save(staging / "runs")
    with atomic_path(args.results) as tmp:
        manager.dataframe().drop(columns=list(TIMINGS)).to_csv(tmp, index=False)
    write_json(args.best, max(finals, key=lambda f: f["val_accuracy"]))
    write_json(args.env, runtime.environment(configs[0], device, threads.cores))


if __name__ == "__main__":
    cli.run(main)
