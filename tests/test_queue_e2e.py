"""End-to-end: `dvc queue start -j 2` runs queued experiments side by side, with the bits of a run made directly."""

import json
import shutil
import time

import pytest

from .test_dvc_e2e import repo_copy, sh

pytestmark = pytest.mark.e2e

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


def test_queue_with_two_workers_gives_each_experiment_the_bits_of_a_direct_run(mirror, tmp_path):
    repo = repo_copy(tmp_path / "repo", mirror)  # FMNIST_MIRROR goes into the environment the queue workers inherit
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    for lr in LRS:
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"lr={lr}")
    try:
        sh(repo, "dvc", "queue", "start", "-j", "2")
        status = wait_for_queue(repo)
    finally:
        sh(repo, "dvc", "queue", "stop", check=False)  # idle workers would otherwise linger for a while
    assert status.count("Success") == 2, status
    queued = queued_metrics(repo)
    assert set(queued) == set(LRS)
    assert all(0 < queued[lr]["metrics/eval.json"]["test_accuracy"] <= 1 for lr in LRS)

    # the same experiments in the workspace, one at a time; without the run-cache, which the
    # queued runs filled, DVC would restore their outputs instead of training
    shutil.rmtree(repo / ".dvc" / "cache" / "runs")
    for lr in LRS:
        out = sh(repo, "dvc", "exp", "run", "-S", f"lr={lr}").stdout
        assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
        direct = {name: json.loads((repo / name).read_text()) for name in METRICS}
        assert direct == queued[lr], lr  # bit for bit: the two runs side by side shared the cores, 1 thread each
