"""End-to-end: the real dvc commands in a temporary git copy of this repository, on small data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

pytestmark = pytest.mark.e2e

SMALL = {"data": {"val_size": 500, "train_size": 2000, "split_seed": 0}, "epochs": 2, "batch_size": 100}


ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = ENV
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_params(repo: Path, **changes) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def repo_copy(dest: Path, mirror: Path) -> Path:
    """A git repository at ``dest`` holding this one's tracked files (no outputs), with small-data parameters."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    set_params(dest, **SMALL, sweep={"lr": [0.01, 0.02], "batch_size": [100], "epochs": [1]})
    ENV["FMNIST_MIRROR"] = str(mirror)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "config", "user.email", "e2e@example.com")
    sh(dest, "git", "config", "user.name", "e2e")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "small")
    return dest


@pytest.fixture(scope="module")
def repo(mirror, tmp_path_factory) -> Path:
    """A git repository holding this one's tracked files (no outputs), with small-data parameters."""
    return repo_copy(tmp_path_factory.mktemp("e2e") / "repo", mirror)


@pytest.fixture(scope="module")
def reproduced(repo) -> subprocess.CompletedProcess:
    proc = sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    return proc


def test_repro_builds_every_output(repo, reproduced):
    for stage in ("extract", "transform", "train", "evaluate", "sweep"):
        assert f"Running stage '{stage}'" in reproduced.stdout
    for out in ("data/raw", "data/processed", "models/model.pt", "runs/train", "metrics/train.json",
                "metrics/eval.json", "metrics/confusion.csv", "plots/confusion.png", "plots/misclassified.png"):
        assert (repo / out).exists(), out
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert 0.3 < metrics["test_accuracy"] <= 1 and len(metrics["per_class_accuracy"]) == 10


def test_second_repro_does_nothing(repo, reproduced):
    out = sh(repo, "dvc", "repro").stdout
    assert "Data and pipelines are up to date." in out
    assert "Running stage" not in out


def test_a_forced_rerun_with_nothing_changed_leaves_git_clean(repo, reproduced):
    # every file kept in git (metrics, plot data, the run environment) is a function of the inputs:
    # no timings, no thread counts that vary with load; and the checkpoints come out bit for bit
    lock = (repo / "dvc.lock").read_text()
    out = sh(repo, "dvc", "repro", "--force", "train", "evaluate", "sweep").stdout
    assert "Running stage 'train'" in out and "Running stage 'sweep'" in out
    assert sh(repo, "git", "status", "--porcelain").stdout == ""
    assert (repo / "dvc.lock").read_text() == lock


def test_exp_run_with_a_new_lr_reruns_train_and_evaluate_only_and_diffs_show_it(repo, reproduced):
    old_lr = yaml.safe_load((repo / "params.yaml").read_text())["lr"]
    assert old_lr != 0.02
    out = sh(repo, "dvc", "exp", "run", "-S", "lr=0.02").stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    for stage in ("extract", "transform", "sweep"):
        assert f"Running stage '{stage}'" not in out
    assert yaml.safe_load((repo / "params.yaml").read_text())["lr"] == 0.02

    metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "--json").stdout)
    assert "metrics/eval.json" in metrics and "test_accuracy" in metrics["metrics/eval.json"]
    change = metrics["metrics/train.json"]["train_loss"]
    assert change["old"] != change["new"]

    params_diff = json.loads(sh(repo, "dvc", "params", "diff", "--json").stdout)
    assert (params_diff["params.yaml"]["lr"]["old"], params_diff["params.yaml"]["lr"]["new"]) == (old_lr, 0.02)

    show = sh(repo, "dvc", "exp", "show", "--csv").stdout
    assert "test_accuracy" in show and "0.02" in show


def test_plots_show_writes_html(repo, reproduced, tmp_path):
    sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "val_accuracy" in html and "confusion" in html.lower()


def test_sweep_stage_outputs_are_dvc_metrics_and_plots(repo, reproduced):
    best = json.loads((repo / "metrics/sweep_best.json").read_text())
    assert best["params"]["lr"] in (0.01, 0.02)
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    workspace = next(iter(shown.values()))["data"]  # the workspace's key is "" in DVC 3
    assert workspace["metrics/sweep_best.json"]["data"]["val_accuracy"] == best["val_accuracy"]


def test_dvc_queue_runs_a_grid_that_exp_show_lists(repo, reproduced):
    import time

    import pandas as pd

    sh(repo, "dvc", "exp", "run", "--queue", "-S", "lr=0.01,0.02", "-S", "batch_size=100,1000")
    sh(repo, "dvc", "queue", "start")
    deadline = time.monotonic() + 900
    while True:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not any(s in status for s in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 4, status
    show = pd.read_csv(__import__("io").StringIO(sh(repo, "dvc", "exp", "show", "--csv").stdout))
    exps = show[show["typ"].str.startswith("branch")]  # may also hold experiments run before this test
    grid = {(0.01, 100), (0.01, 1000), (0.02, 100), (0.02, 1000)}
    queued = exps[[pair in grid for pair in zip(exps["lr"], exps["batch_size"])]]
    assert set(zip(queued["lr"], queued["batch_size"])) == grid
    assert queued["test_accuracy"].notna().all()
