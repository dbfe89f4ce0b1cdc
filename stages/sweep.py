"""DVC stage `sweep`: train every combination in params.yaml's `sweep:` grid with the train stage's code.

Keys the grid does not list take their built-in defaults; device, cpu_kernel, numerics and precision
come from the top level. The runs are trained side by side in `sweep_workers` processes (0 = one per
core; see fmnist.sweep). Writes one row per run and epoch (metrics/sweep.csv, without timings, so
that git sees only results), the best run by validation accuracy (metrics/sweep_best.json), what
decided the bits (metrics/sweep_env.json), and a TensorBoard folder per run under runs/sweep/ beside
the seed's full RunManager table, durations included, and the machine's record (runs/sweep/runs.csv,
runs.json and machine.json, which .dvcignore keeps out of dvc.lock).
"""

import argparse
import sys

from fmnist import params, resume, runtime, stage, sweep
from fmnist.fileio import atomic_dir, write_csv, write_json
from fmnist.tracking import TIMINGS, RunBuilder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", required=True, help="one row per run and epoch, no timings")
    parser.add_argument("--best", required=True)
    parser.add_argument("--env", required=True, help="what the runs computed on")
    parser.add_argument("--logdir", required=True, help="TensorBoard root, one folder per run, and runs.csv")
    parser.add_argument("--state", required=True,
                        help="finished runs and the current run's last epoch, to resume from (removed at the end)")
    args = parser.parse_args()  # outputs have no default: dvc.yaml names every path

    raw = params.load(args.params)
    runs = RunBuilder.get_runs(params.sweep_grid(raw))
    configs = params.sweep_runs(raw, runs)  # every run checked before the first starts
    cores = runtime.available_cores()
    workers = sweep.worker_count(params.sweep_workers(raw), len(runs), cores)
    threads = sweep.threads_per_run(cores, workers)
    device = runtime.configure(configs[0])  # the runtime keys are the top level's, the same for every run

    runs_values = {"runs": [params.training_values(p) for p in configs]}  # not the worker count: either resumes
    env = runtime.environment(configs[0], device, threads)
    state = resume.SavedState(args.state, resume.fingerprint(runs_values, args.data, __file__, env))
    with atomic_dir(args.logdir) as staging:  # runs/sweep appears whole at the end
        manager = sweep.run_sweep(runs, configs, args.data, staging, state, device, workers, threads,
                                  progress=sys.stderr.isatty())
        manager.save(staging / "runs")
        write_json(staging / "machine.json", {**runtime.machine(device, threads), "sweep_workers": workers})
    write_csv(args.results, [{k: v for k, v in row.items() if k not in TIMINGS} for row in manager.run_data])
    write_json(args.best, max(sweep.finals(runs, manager), key=lambda f: f["val_accuracy"]))
    write_json(args.env, env)
    state.clear()


if __name__ == "__main__":
    stage.run(main)
