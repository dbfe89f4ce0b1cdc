"""DVC stage `sweep`: train every combination in params.yaml's `sweep:` grid with the train stage's code.

Keys the grid does not list take their built-in defaults; device, cpu_kernel and numerics come
from the top level. Writes one row per run and epoch (metrics/sweep.csv, without timings, so that
git sees only results), the best run by validation accuracy (metrics/sweep_best.json), and a
TensorBoard folder per run under runs/sweep/ beside the seed's full RunManager table, durations
included (runs/sweep/runs.csv and .json, which .dvcignore keeps out of dvc.lock).
"""

import argparse
import sys

from fmnist import cli, params, resume, runtime
from fmnist.data import load_processed
from fmnist.engine import final_metrics, to_device, train_run
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
    parser.add_argument("--state", default=".resume/sweep.pt",
                        help="finished runs and the current run's last epoch, to resume from (removed at the end)")
    args = parser.parse_args()

    raw = params.load(args.params)
    runs = RunBuilder.get_runs(params.sweep_grid(raw))
    configs = params.sweep_runs(raw, runs)  # every run checked before the first starts
    device = runtime.configure(configs[0])  # the runtime keys are the top level's, the same for every run
    data = load_processed(args.data)
    train, val = (to_device(s, data.mean, data.std, device) for s in (data.train, data.val))

    runs_values = {"runs": [params.training_values(p) for p in configs]}
    state = resume.SavedState(args.state, resume.fingerprint(runs_values, args.data, __file__))
    saved = state.load() or {"finished": [], "current": None}
    finished = saved["finished"]  # per finished run: its rows and its TensorBoard folder's files

    finals = []
    with runtime.ThreadShare() as threads, atomic_dir(args.logdir) as staging:  # runs/sweep appears whole at the end
        manager = RunManager(log_root=staging)
        for i, (run, p) in enumerate(zip(runs, configs), 1):
            name = run_name(run)
            if i <= len(finished):  # done before an interruption: its rows and logs are put back as they were
                print(f"sweep run {i}/{len(runs)}: {name}: finished earlier", file=sys.stderr, flush=True)
                manager.add_finished_run(run, finished[i - 1]["rows"])
                resume.restore(staging / name, finished[i - 1]["logs"])
                metrics = final_metrics(finished[i - 1]["rows"])
            else:
                print(f"sweep run {i}/{len(runs)}: {name}", file=sys.stderr, flush=True)
                _, metrics = train_run(
                    p, train, val, manager, run=run, progress=sys.stderr.isatty(), threads=threads,
                    resume=saved["current"] if i == len(finished) + 1 else None,
                    on_epoch=lambda current: state.save(finished=finished, current=current),
                )
                finished.append({"rows": manager.run_rows(), "logs": resume.snapshot(staging / name)})
                state.save(finished=finished, current=None)
            finals.append({"run": i, "name": name, **metrics, "params": run._asdict()})
        manager.save(staging / "runs")
    with atomic_path(args.results) as tmp:
        manager.dataframe().drop(columns=list(TIMINGS)).to_csv(tmp, index=False)
    write_json(args.best, max(finals, key=lambda f: f["val_accuracy"]))
    write_json(args.env, runtime.environment(configs[0], device, threads.cores))
    state.clear()


if __name__ == "__main__":
    cli.run(main)
