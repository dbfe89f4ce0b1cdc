"""End-to-end: the real dvc commands in a temporary git copy of this repository, on small data."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from .e2e import repo_clone, sh

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(pipeline, tmp_path_factory) -> Path:
    """This module's own copy of the reproduced small-data repository (its tests change it)."""
    return repo_clone(pipeline.repo, tmp_path_factory.mktemp("e2e") / "repo")


@pytest.fixture(scope="module")
def reproduced(pipeline) -> subprocess.CompletedProcess:
    """The `dvc repro` that built the outputs from nothing."""
    return pipeline.repro


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
