"""End-to-end: a grid queued with `dvc exp run --queue -S lr=a,b` runs side by side under `dvc queue start -j 2`,
is listed by `dvc exp show`, and an experiment has the bits of the same run made directly."""

import io
import json
import time

import pandas as pd
import pytest

from .e2e import repo_clone, sh

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("pipeline")]  # one worker, one `pipeline` and `experiment`

METRICS = ("metrics/train.json", "metrics/eval.json")


def wait_for_queue(repo, timeout: float = 600) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not any(s in status for s in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(4)  # each `dvc queue status` takes about a second of CPU from the runs it waits for


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


def test_a_queued_grid_runs_on_two_workers_is_listed_and_has_the_bits_of_direct_runs(pipeline, experiment, tmp_path):
    repo = repo_clone(pipeline.repo, tmp_path / "repo")  # the queue workers inherit FMNIST_MIRROR from sh's environment
    lrs = (0.01, experiment.lr)
    sh(repo, "dvc", "exp", "run", "--queue", "-S", f"lr={','.join(map(str, lrs))}")  # DVC's grid syntax
    try:
        sh(repo, "dvc", "queue", "start", "-j", "2")
        status = wait_for_queue(repo)
    finally:
        sh(repo, "dvc", "queue", "stop", check=False)  # idle workers would otherwise linger for a while
    assert status.count("Success") == 2, status
    queued = queued_metrics(repo)
    assert set(queued) == set(lrs)
    assert all(0 < queued[lr]["metrics/eval.json"]["test_accuracy"] <= 1 for lr in lrs)
    show = pd.read_csv(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv").stdout))
    listed = show[show["typ"].str.startswith("branch")]  # the experiments, not the baseline commit
    assert sorted(listed["lr"]) == sorted(lrs) and listed["test_accuracy"].notna().all()

    # bit for bit the experiment run alone in the workspace, with every core to take (side by side, the
    # two runs shared the cores); the other queued run is the same code path with another lr
    direct = {name: json.loads((experiment.repo / name).read_text()) for name in METRICS}
    assert direct == queued[experiment.lr]
