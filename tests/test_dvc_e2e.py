"""End-to-end: the real dvc commands in a temporary git copy of this repository, on small data."""

import csv
import io
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from fmnist import runtime

from .conftest import ALL_CORES, ROOT
from .e2e import git_clone, repo_clone, sh

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("pipeline")]  # one worker, one `pipeline` and `experiment`


@pytest.fixture(scope="module")
def repo(pipeline, tmp_path_factory) -> Path:
    """This module's own copy of the reproduced small-data repository (its tests change it)."""
    return repo_clone(pipeline.repo, tmp_path_factory.mktemp("e2e") / "repo")


@pytest.fixture(scope="module")
def reproduced(pipeline) -> subprocess.CompletedProcess:
    """The `dvc repro` that built the outputs from nothing."""
    return pipeline.repro


def test_repro_builds_every_output(repo, reproduced):
    for stage in ("extract", "transform", "train", "evaluate", "export", "sweep"):
        assert f"Running stage '{stage}'" in reproduced.stdout
    for out in ("data/raw", "data/processed", "models/model.pt", "models/model.pt2", "runs/train", "metrics/train.json",
                "metrics/train_history.csv", "metrics/train_env.json", "metrics/eval_env.json", "metrics/sweep.csv",
                "metrics/eval.json", "metrics/confusion.csv", "plots/confusion.png", "plots/misclassified.png"):
        assert (repo / out).exists(), out
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert 0.3 < metrics["test_accuracy"] <= 1 and len(metrics["per_class_accuracy"]) == 10


def test_second_repro_does_nothing(repo, reproduced):
    out = sh(repo, "dvc", "repro").stdout
    assert "Data and pipelines are up to date." in out
    assert "Running stage" not in out


def test_exp_run_with_a_new_lr_reruns_train_evaluate_and_export_only_and_diffs_show_it(experiment):
    repo, out = experiment.repo, experiment.run.stdout
    assert all(f"Running stage '{stage}'" in out for stage in ("train", "evaluate", "export"))
    for stage in ("extract", "transform", "sweep"):
        assert f"Running stage '{stage}'" not in out
    old_lr = yaml.safe_load(sh(repo, "git", "show", "HEAD:params.yaml").stdout)["lr"]
    assert old_lr != experiment.lr and yaml.safe_load((repo / "params.yaml").read_text())["lr"] == experiment.lr

    metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "--json").stdout)
    assert "metrics/eval.json" in metrics and "test_accuracy" in metrics["metrics/eval.json"]
    change = metrics["metrics/train.json"]["train_loss"]
    assert change["old"] != change["new"]

    params_diff = json.loads(sh(repo, "dvc", "params", "diff", "--json").stdout)
    assert (params_diff["params.yaml"]["lr"]["old"], params_diff["params.yaml"]["lr"]["new"]) == (old_lr, experiment.lr)

    show = sh(repo, "dvc", "exp", "show", "--csv").stdout
    assert "test_accuracy" in show and str(experiment.lr) in show


def test_the_readmes_experiment_table_has_its_six_columns(pipeline):
    command = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("dvc exp show --md"))
    table = sh(pipeline.repo, *shlex.split(command)).stdout.splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["Experiment", "test_accuracy", "model", "lr", "batch_size", "epochs"]
    assert [cell.strip() for cell in table[2].strip("|").split("|")][0] == "workspace"


def test_a_failed_experiment_leaves_no_model_and_dvc_checkout_restores_the_locked_one(pipeline, tmp_path):
    repo = repo_clone(pipeline.repo, tmp_path / "repo")
    locked = (repo / "models" / "model.pt").read_bytes()
    failed = sh(repo, "dvc", "exp", "run", "-S", "optimizer=adamw", check=False)
    assert failed.returncode != 0 and "error: params.yaml: optimizer must be" in failed.stdout + failed.stderr
    assert not (repo / "models" / "model.pt").exists()  # DVC removed the stage's outputs before running it
    restored = sh(repo, "dvc", "checkout", "models/model.pt")
    assert "Running stage" not in restored.stdout
    assert (repo / "models" / "model.pt").read_bytes() == locked


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


def no_load_errors(proc: subprocess.CompletedProcess) -> str:
    assert "failed to load" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    return proc.stdout


def test_a_clone_shows_every_committed_result_with_no_cache_pull_or_repro(experiment, tmp_path):
    a = repo_clone(experiment.repo, tmp_path / "a")
    sh(a, "git", "commit", "-qam", f"lr {experiment.lr}")  # the experiment's new results
    b = git_clone(a, tmp_path / "b")
    assert not (b / ".dvc" / "cache").exists() and not (b / "models" / "model.pt").exists()

    shown = json.loads(no_load_errors(sh(b, "dvc", "metrics", "show", "--json")))
    workspace = next(iter(shown.values()))["data"]
    for name in ("metrics/train.json", "metrics/eval.json", "metrics/sweep_best.json"):
        assert workspace[name]["data"] == json.loads((a / name).read_text()), name

    diff = json.loads(no_load_errors(sh(b, "dvc", "metrics", "diff", "HEAD~1", "--json")))
    old, new = (json.loads(sh(a, "git", "show", f"{rev}:metrics/eval.json").stdout) for rev in ("HEAD~1", "HEAD"))
    change = diff["metrics/eval.json"]["test_loss"]
    assert (change["old"], change["new"]) == (old["test_loss"], new["test_loss"]) and old != new
    assert "train_loss" in diff["metrics/train.json"]

    params = json.loads(sh(b, "dvc", "params", "diff", "HEAD~1", "--json").stdout)
    assert (params["params.yaml"]["lr"]["old"], params["params.yaml"]["lr"]["new"]) == (0.05, experiment.lr)

    table = no_load_errors(sh(b, "dvc", "exp", "show", "-n", "2", "--csv"))
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [float(r["test_loss"]) for r in rows if r["rev"] != "workspace"] == [new["test_loss"], old["test_loss"]]

    plots = json.loads(no_load_errors(sh(b, "dvc", "plots", "diff", "HEAD~1", "--json")))["data"]
    for name in ("Loss", "Accuracy", "Confusion", "Sweep"):
        (plot,) = plots[name]
        assert {row["rev"] for row in plot["content"]["data"]["values"]} == {"HEAD~1", "workspace"}, name
    for image in ("plots/confusion.png", "plots/misclassified.png"):
        assert sorted(rev for shown in plots[image] for rev in shown["revisions"]) == ["HEAD~1", "workspace"]
        assert all(Path(shown["url"]).stat().st_size > 0 for shown in plots[image])


def test_a_clone_reproduces_every_output_elsewhere_on_another_thread_count_and_git_stays_clean(pipeline, tmp_path):
    """Another checkout path, user, home, host time zone and locale, another OMP_NUM_THREADS (ThreadShare may
    still lower a training's threads to the cores free), and nothing but git to start from: the first
    `dvc repro` reruns every stage and changes no hash."""
    b = git_clone(pipeline.repo, tmp_path / "elsewhere" / "b")
    threads = 1 if runtime.available_cores() > 1 else ALL_CORES  # not the pipeline's setting
    env = {"OMP_NUM_THREADS": str(threads), "HOME": str(tmp_path), "USER": "someone", "TZ": "Pacific/Kiritimati",
           "LANG": "C", "LC_ALL": "C"}
    repro = sh(b, "dvc", "repro", env=env).stdout
    for stage in ("extract", "transform", "train", "export", "sweep"):
        assert f"Running stage '{stage}'" in repro, repro
    # the checkpoint came out as committed, so evaluate's committed results are up to date
    assert "Stage 'evaluate' didn't change, skipping" in repro, repro
    assert sh(b, "git", "status", "--porcelain").stdout == ""
    sh(b, "dvc", "repro", "--force", "--single-item", "evaluate", env=env)  # and evaluate reproduces them
    assert sh(b, "git", "status", "--porcelain").stdout == ""
