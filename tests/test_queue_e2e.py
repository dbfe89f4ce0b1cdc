"""End-to-end: a grid queued with `dvc exp run --queue -S lr=a,b` runs side by side under `dvc queue start -j 2`,
is listed by `dvc exp show`, and an experiment has the bits of the same run made directly."""

import io
import json
import shutil
import time

import pandas as pd
import pytest

from .e2e import repo_clone, sh

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("pipeline")]  # one worker builds `pipeline` once

LRS = (0.01, 0.02)
METRICS = ("metrics/train.json", "metrics/eval.json")


def wait_for_queue(repo, timeout: float = 600) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not any(s in status for s in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(2)


def queued_metrics(repo) -> dict[float, dict]:
    """lr -> {metrics file: its values} for every experiment `dvc exp show --json` lists."""
    found = {}
    for commit in json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                lr = data["params"]["params.yaml"]["data"]["lr"]
                found[lr] = {name: data["metrics"][name]["data"] for name in METRICS}
    return found


def test_a_queued_grid_runs_on_two_workers_is_listed_and_has_the_bits_of_direct_runs(pipeline, tmp_path):
    repo = repo_clone(pipeline.repo, tmp_path / "repo")  # the queue workers inherit FMNIST_MIRROR from sh's environment
    sh(repo, "dvc", "exp", "run", "--queue", "-S", f"lr={','.join(map(str, LRS))}")  # DVC's grid syntax
    try:
        sh(repo, "dvc", "queue", "start", "-j", "2")
        status = wait_for_queue(repo)
    finally:
        sh(repo, "dvc", "queue", "stop", check=False)  # idle workers would otherwise linger for a while
    assert status.count("Success") == 2, status
    queued = queued_metrics(repo)
    assert set(queued) == set(LRS)
    assert all(0 < queued[lr]["metrics/eval.json"]["test_accuracy"] <= 1 for lr in LRS)
    show = pd.read_csv(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv").stdout))
    listed = show[show["typ"].str.startswith("branch")]  # the experiments, not the baseline commit
    assert sorted(listed["lr"]) == sorted(LRS) and listed["test_accuracy"].notna().all()

    # the second experiment again in the workspace, alone (the first is the same code path with
    # another lr: one direct run keeps this test's time down); without the run-cache, which the
    # queued runs filled, DVC would restore its outputs instead of training
    shutil.rmtree(repo / ".dvc" / "cache" / "runs")
    lr = LRS[1]
    out = sh(repo, "dvc", "exp", "run", "-S", f"lr={lr}").stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    direct = {name: json.loads((repo / name).read_text()) for name in METRICS}
    assert direct == queued[lr], lr  # bit for bit: the two runs side by side shared the cores, 1 thread each
