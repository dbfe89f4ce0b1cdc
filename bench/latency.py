"""Experiment latency: what `dvc exp run -S lr=0.02` costs beyond the training itself, measured in one run.

    python bench/latency.py              # one experiment (about a minute with the default params)
    python bench/latency.py --rounds 3   # three, with lr 0.02, 0.03, 0.04

In a temporary copy of this repository (its files as they are now, committed there, the
default params.yaml with a one-run sweep so that the baseline is quick), the baseline
`dvc repro` runs first; then each round runs `dvc exp run -S lr=...` as a user would and
compares its wall time with the training time the train stage logs for the same run (15 epochs,
validation included). The evaluate stage is then run alone, `import torch` for scale, and the
same experiment again, with nothing left to run: DVC's own work alone. Last, what each library a
stage might load costs at its start.

Where the rest goes: during the experiment every Python process (DVC and the two stages) logs when
it started and when it exited, through a ``sitecustomize`` module on PYTHONPATH (nothing in the
repository changes), and the wall time is cut into DVC before, between and after the stages, the
train stage beyond its training, and the evaluate stage. The
raw files come from data/raw (run `dvc repro extract` first) or FMNIST_MIRROR: nothing is
downloaded. ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINED = re.compile(r"train: \d+ epochs in ([0-9.]+) s")  # fmnist.engine.train_run's log line
# imported by every Python process the experiment starts: one line when it starts, one when it exits
TIMELINE_HOOK = """\
import atexit, os, sys, time
def _log(event):
    with open(os.environ["FMNIST_LATENCY_LOG"], "a") as f:
        f.write(f"{time.time():.4f} {event} {os.getpid()} {' '.join(sys.argv[:2])}\\n")
_log("start")
atexit.register(_log, "exit")
"""


def copy_repo(dest: Path) -> None:
    """This repository's tracked and new (not ignored) files, as a fresh git repository at ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["sweep"] = {"lr": [0.05], "batch_size": [1000], "epochs": [1]}  # the experiment never runs it
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=bench@localhost",
                                                  "commit", "-qm", "baseline"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True)


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout + proc.stderr


# what a stage may import, and what each costs at its start: a fresh process per import, median of 5
IMPORTS = {
    "torch": "import torch",
    "torch + torch._inductor.config (torch.use_deterministic_algorithms)": "import torch, torch._inductor.config",
    "torch + torch._dynamo (torch.optim, at its first use)": "import torch, torch._dynamo",
    "torch + torchvision.utils": "import torch, torchvision.utils",
    "torch + matplotlib.pyplot": "import torch, matplotlib.pyplot",
    "dvc": "import dvc.cli, dvc.repo",
}


def import_costs(env: dict, repeats: int = 5) -> dict[str, float]:
    costs = {}
    for name, code in IMPORTS.items():
        costs[name] = statistics.median(timed([sys.executable, "-c", code], ROOT, env)[0] for _ in range(repeats))
    return costs


def timeline(log: Path, training: float) -> dict[str, float]:
    """Seconds of the experiment's wall time by whose they are, from ``TIMELINE_HOOK``'s log."""
    at, pids = {}, {}
    for line in log.read_text().splitlines():
        stamp, event, pid, argv = line.split(" ", 3)
        who = next((name for name in ("train", "evaluate") if f"stages/{name}.py" in argv), "dvc")
        if pids.setdefault(who, pid) == pid:  # the first process of each: DVC's own, not a daemon it starts
            at[who, event] = float(stamp)
    need = {(w, e) for w in ("dvc", "train", "evaluate") for e in ("start", "exit")}
    if need - at.keys():
        sys.exit(f"the timeline lacks {sorted(need - at.keys())}:\n{log.read_text()}")
    return {
        "dvc_before_s": at["train", "start"] - at["dvc", "start"],
        "train_beyond_training_s": at["train", "exit"] - at["train", "start"] - training,
        "dvc_between_s": at["evaluate", "start"] - at["train", "exit"],
        "evaluate_s": at["evaluate", "exit"] - at["evaluate", "start"],
        "dvc_after_s": at["dvc", "exit"] - at["evaluate", "exit"],
    }


def stage_command(repo: Path, stage: str) -> list[str]:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="experiments, each with a new lr")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    raw = ROOT / "data" / "raw"
    mirror = str(raw) if (raw / "train-images-idx3-ubyte.gz").is_file() else os.environ.get("FMNIST_MIRROR")
    if not mirror:
        sys.exit("no raw data: run `dvc repro extract` first (or set FMNIST_MIRROR to a folder of the four files)")
    env = {**os.environ, "FMNIST_MIRROR": mirror,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)

    rounds = []
    with tempfile.TemporaryDirectory(prefix="fmnist-latency-") as tmp:
        repo = Path(tmp) / "repo"
        copy_repo(repo)
        hook = Path(tmp) / "hook" / "sitecustomize.py"
        hook.parent.mkdir()
        hook.write_text(TIMELINE_HOOK)
        print("baseline: dvc repro ...", file=sys.stderr, flush=True)
        timed(["dvc", "repro"], repo, env)
        timed(["git", "add", "-A"], repo, env)
        timed(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "repro"],
              repo, env)
        for k in range(args.rounds):
            lr = round(0.02 + 0.01 * k, 2)
            log = Path(tmp) / f"timeline-{k}.log"
            wall, out = timed(["dvc", "exp", "run", "-S", f"lr={lr}"], repo,
                              {**env, "PYTHONPATH": str(hook.parent), "FMNIST_LATENCY_LOG": str(log)})
            found = TRAINED.search(out)
            if not found or "Running stage 'evaluate'" not in out:
                sys.exit(f"dvc exp run -S lr={lr} did not train and evaluate:\n{out}")
            training = float(found.group(1))
            evaluate, _ = timed(stage_command(repo, "evaluate"), repo, env)
            torch_import, _ = timed([sys.executable, "-c", "import torch"], repo, env)
            # the same experiment again: every stage is up to date, so this is DVC's own work for an experiment
            again, out = timed(["dvc", "exp", "run", "-S", f"lr={lr}"], repo, env)
            if "Running stage" in out:
                sys.exit(f"dvc exp run -S lr={lr} a second time ran a stage:\n{out}")
            parts = timeline(log, training)
            rounds.append({"lr": lr, "wall_s": wall, "training_s": training, "overhead_s": wall - training,
                           "ratio": wall / training, "evaluate_s": evaluate, "import_torch_s": torch_import,
                           "dvc_alone_s": again, **{f"during_{key}": v for key, v in parts.items()},
                           "during_unaccounted_s": wall - training - sum(parts.values())})
            print(f"dvc exp run -S lr={lr}: {wall:.1f} s, training {training:.1f} s, the rest {wall - training:.1f} s "
                  f"(ratio {wall / training:.2f}); evaluate alone {evaluate:.2f} s; import torch {torch_import:.2f} s; "
                  f"the same experiment again, nothing to run, {again:.1f} s",
                  file=sys.stderr, flush=True)

    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "lr"}
    print(f"\nexperiment latency ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"medians of {len(rounds)} round(s))")
    print(f"  dvc exp run -S lr=...   {median['wall_s']:6.1f} s wall")
    print(f"  training (train stage)  {median['training_s']:6.1f} s")
    print(f"  everything else         {median['overhead_s']:6.1f} s   (wall / training = {median['ratio']:.2f}x)")
    print(f"  evaluate stage alone    {median['evaluate_s']:6.2f} s   "
          f"(import torch alone {median['import_torch_s']:.2f} s)")
    print(f"  DVC alone               {median['dvc_alone_s']:6.1f} s   (the same experiment again: nothing to run)")
    print("\nwhere everything else goes, during the experiment")
    for key, label in (("dvc_before_s", "DVC before the train stage (start-up, params, status)"),
                       ("train_beyond_training_s", "train stage beyond training (imports, data, logs, checkpoint)"),
                       ("dvc_between_s", "DVC between the stages (train's outputs hashed and cached)"),
                       ("evaluate_s", "evaluate stage"),
                       ("dvc_after_s", "DVC after (evaluate's outputs, dvc.lock, the experiment's commit)"),
                       ("unaccounted_s", "process start-up and exit outside the hooks")):
        print(f"  {label:68s} {median['during_' + key]:5.2f} s")
    costs = import_costs(env)
    print("\nimports at a stage's start (a fresh process each, median of 5)")
    for name, seconds in costs.items():
        print(f"  {name:70s} {seconds:5.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "median": median, "imports": costs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
