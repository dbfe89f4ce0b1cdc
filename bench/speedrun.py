"""Fashion-MNIST speedrun: time-to-accuracy records, each a preset trained over several seeds.

    python bench/speedrun.py                          # every record, 3 seeds each, on the default device
    python bench/speedrun.py --records fastnet94      # one record
    python bench/speedrun.py --device cuda --seeds 0 1 2 3 4   # on the GPU, 5 seeds
    python bench/speedrun.py --table a.json b.json    # the table of runs saved with --json

A record is a preset (``bench/<name>.yaml``: params.yaml keys over the built-in defaults) and a
target test accuracy. Each seed trains in its own process exactly as the train stage does
(numerics pinned, deterministic algorithms, every core), on the pipeline's 55,000 training
images, and is then evaluated on the 10,000 test images as the evaluate stage does (with the
preset's ``tta``). The time is the training alone, validation after each epoch included; start-up,
data loading and the test predictions are not in it. A record holds when the mean accuracy over
the seeds reaches its target. Prints a Markdown table (machine, mean and spread of accuracy and
time, the command that reproduces each row); ``--json FILE`` also writes every run. Needs
data/processed (`dvc repro transform`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
# name -> target test accuracy; the preset is bench/<name>.yaml
RECORDS = {"network90": 0.90, "fastnet93": 0.93, "fastnet94": 0.94}


def preset(name: str) -> dict:
    return yaml.safe_load((BENCH / f"{name}.yaml").read_text())


def command(values: dict) -> str:
    """The `dvc exp run` that trains ``values`` in the pipeline."""
    def show(v):
        return str(v).lower() if isinstance(v, bool) else str(v)
    return "dvc exp run " + " ".join(f"-S {k}={show(v)}" for k, v in values.items())


def worker(name: str, seed: int, device: str, data: str) -> None:
    """One seed of one record, in this process: prints its figures as one JSON line."""
    import io

    from fmnist import params, runtime
    from fmnist.data import load_processed
    from fmnist.tracking import RunManager

    values = preset(name)
    p = params.train_params({}, **{**values, "seed": seed, "device": device})
    dev = runtime.configure(p)
    from fmnist.engine import evaluate, to_device, train_run

    processed = load_processed(data)
    train, val, test = (to_device(s, processed.mean, processed.std, dev)
                        for s in (processed.train, processed.val, processed.test))
    manager = RunManager(stream=io.StringIO())
    model, metrics = train_run(p, train, val, manager)
    seconds = manager.run_rows()[-1]["run_duration"]  # the epochs, validation included: what the stage logs
    _, accuracy, _ = evaluate(model, test, tta=p.tta, precision=p.precision)
    print(json.dumps({"record": name, "preset": values, "seed": seed, "device": str(dev), "seconds": seconds,
                      "test_accuracy": accuracy, "val_accuracy": metrics["val_accuracy"],
                      "environment": {**runtime.environment(p, dev, runtime.available_cores()),
                                      **runtime.machine(dev, runtime.available_cores())}}))


def run_seed(name: str, seed: int, device: str, data: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, str(seed), "--device", device, "--data", data],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name}, seed {seed} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(env: dict) -> str:
    if env.get("gpu"):
        return f"{env['gpu']} (CUDA {env['cuda']})"
    return f"{env['cpu']}, {env['threads']} cores"


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| record | target | test accuracy: mean (min-max) | training time: mean (min-max) | seeds | holds "
            "| machine | reproduce |",
            "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        acc = [r["test_accuracy"] for r in runs]
        sec = [r["seconds"] for r in runs]
        holds = statistics.mean(acc) >= RECORDS[name]
        presets = {json.dumps(r["preset"], sort_keys=True) for r in runs}
        if len(presets) > 1:
            sys.exit(f"{name}: runs of different presets cannot share a row: {' / '.join(sorted(presets))}")
        rows.append(
            f"| {name} | {RECORDS[name]:.1%} | {statistics.mean(acc):.2%} ({min(acc):.2%}-{max(acc):.2%}) "
            f"| {statistics.mean(sec):.0f} s ({min(sec):.0f}-{max(sec):.0f}) | {len(runs)} "
            f"| {'yes' if holds else 'no'} "
            f"| {machine(runs[0]['environment'])} | `{command(runs[0]['preset'])}` |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", nargs="+", choices=list(RECORDS), default=list(RECORDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds each record trains")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data", default=str(ROOT / "data" / "processed"))
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: print the table of runs that earlier --json files hold")
    parser.add_argument("--worker", nargs=2, metavar=("RECORD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.device, args.data)
        return
    if args.table:
        results: dict[str, list[dict]] = {}
        for path in args.table:
            for name, runs in json.loads(path.read_text()).items():
                results.setdefault(name, []).extend(runs)
        print(table(results))
        return
    if not (Path(args.data) / "meta.json").is_file():
        sys.exit(f"no processed data in {args.data}: run `dvc repro transform` first")

    results = {}
    started = time.perf_counter()
    for name in args.records:
        for seed in args.seeds:
            run = run_seed(name, seed, args.device, args.data)
            results.setdefault(name, []).append(run)
            print(f"{name} seed {seed}: test accuracy {run['test_accuracy']:.2%}, {run['seconds']:.1f} s of training "
                  f"({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
    torch_version = results[args.records[0]][0]["environment"]["torch"]
    print(f"\nFashion-MNIST speedrun (Python {platform.python_version()}, torch {torch_version}, "
          f"{os.cpu_count()} CPUs visible)\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
