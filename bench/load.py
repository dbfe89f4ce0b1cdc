"""Trainings at once on one machine: total throughput against one training alone, measured in one run.

    python bench/load.py                    # 1, then 2 trainings at once, sharing the cores and not
    python bench/load.py --trainings 1 2 4  # more at once

Each training is a separate process running the default training (params.yaml) as the train
stage runs it: numerics pinned, the cores shared through fmnist.threadshare.ThreadShare. The row
"not shared" gives every training every core, as each did before the share existed, and shows
what sharing saves. Needs data/processed (`dvc repro transform`). ``--json FILE`` writes the
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).resolve()


def worker(args) -> None:
    """One training: ``args.epochs`` epochs, the first not timed; prints images/s as JSON."""
    import torch

    from fmnist import params, runtime, threadshare
    from fmnist.data import load_processed
    from fmnist.engine import to_device, train_one_epoch, training_state
    from fmnist.models import build_model

    p = params.train_params(params.load(args.params))
    device = runtime.configure(p)
    data = load_processed(args.data)
    train = to_device(data.train, data.mean, data.std, device)
    model = build_model(p.model, p.width, p.seed, cpu_kernel=p.cpu_kernel).to(memory_format=torch.channels_last)
    opt, sched, gen = training_state(model, p, len(train), device)
    share = threadshare.ThreadShare() if args.share else contextlib.nullcontext()
    with share:
        seconds = 0.0
        for epoch in range(args.epochs):
            if args.share:
                share.rebalance(p, device.type)
            start = time.perf_counter()
            train_one_epoch(model, train, opt, sched, p, gen)
            if epoch:  # the first epoch overlaps the other trainings' start-up
                seconds += time.perf_counter() - start
    print(json.dumps({"images_per_s": (args.epochs - 1) * len(train) / seconds, "threads": torch.get_num_threads()}))


def run_at_once(n: int, share: bool, args) -> list[dict]:
    cmd = [sys.executable, str(WORKER), "--worker", "--epochs", str(args.epochs), "--data", args.data,
           "--params", args.params] + ([] if share else ["--no-share"])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    out = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"a training failed: {out}")
    return [json.loads(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--trainings", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=4, help="per training; the first is not timed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-share", dest="share", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")

    from fmnist import runtime

    print(f"{runtime.cpu_model()}, {runtime.available_cores()} cores; default training from {args.params}, "
          f"{args.epochs - 1} timed epochs each", flush=True)
    alone = run_at_once(1, True, args)[0]["images_per_s"]
    rows = [{"trainings": 1, "shared": True, "images_per_s": [alone], "total": alone, "of_alone": 1.0}]
    print(f"\n{'trainings':>9} {'cores':>10} {'images/s each':>24} {'total':>9} {'of one alone':>13}")
    print(f"{1:>9} {'shared':>10} {alone:>24,.0f} {alone:>9,.0f} {1:>12.0%}", flush=True)
    for n in (t for t in args.trainings if t > 1):
        for share in (True, False):
            results = run_at_once(n, share, args)
            rates = [r["images_per_s"] for r in results]
            rows.append({"trainings": n, "shared": share, "images_per_s": rates, "total": sum(rates),
                         "of_alone": sum(rates) / alone, "threads": [r["threads"] for r in results]})
            each = ", ".join(f"{r:,.0f}" for r in rates)
            print(f"{n:>9} {'shared' if share else 'not shared':>10} {each:>24} {sum(rates):>9,.0f} "
                  f"{sum(rates) / alone:>12.0%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
