"""The sweep's runs side by side in worker processes and one after another: the same bytes, clean failures, and
resuming a sweep cut short in either way, each compared with one uninterrupted sequential sweep."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fmnist import runtime
from fmnist.sweep import threads_per_run, worker_count

from .conftest import ALL_CORES, ROOT, WHOLE_MACHINE
from .test_resume import kill_when, same_tree

TIMINGS = ["epoch_duration", "run_duration"]


def sweep(out: Path, data: Path, workers: int, grid: dict, wait: bool = True, env: dict | None = None):
    """The real stage script with every output under ``out`` (``env``: changes to this process's environment);
    tagged so that its worker processes can be found."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump({"sweep_workers": workers, "sweep": grid}, sort_keys=False))
    cmd = [sys.executable, str(ROOT / "stages" / "sweep.py"), "--data", str(data), "--params", str(out / "params.yaml"),
           "--results", str(out / "metrics" / "sweep.csv"), "--best", str(out / "metrics" / "best.json"),
           "--env", str(out / "metrics" / "env.json"), "--logdir", str(out / "runs"), "--state", str(out / "state.pt")]
    env = {**os.environ, **(env or {}), "FMNIST_SWEEP_TEST": str(out)}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = open(out / "log.txt", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = out / "log.txt"
    return proc


def workers_alive(tag: Path) -> list[int]:
    """Pids of the worker processes (multiprocessing's spawn_main) started for the sweep tagged ``tag``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (f"FMNIST_SWEEP_TEST={tag}\0".encode() in (proc / "environ").read_bytes()
                    and b"spawn_main" in (proc / "cmdline").read_bytes()
                    and "State:\tZ" not in (proc / "status").read_text()):
                pids.append(int(proc.name))
        except (OSError, ValueError):  # gone meanwhile, not a process, or not ours to read
            continue
    return pids


@pytest.mark.parametrize("setting, runs, cores, workers, threads", [
    (0, 4, 2, 2, 1),  # auto: one worker per core
    (0, 3, 16, 3, 5),  # auto: no more workers than runs; 16 // 3 threads each
    (0, 1, 2, 1, 2),  # a single run keeps every core
    (1, 4, 2, 1, 2),  # sequential: every core for each run, as before workers existed
    (4, 4, 2, 4, 1),  # more workers than cores: asked for, still at least one thread each
    (8, 3, 16, 3, 5),  # more workers than runs: the extra ones would idle
])
def test_workers_and_threads_split_the_cores(setting, runs, cores, workers, threads):
    assert worker_count(setting, runs, cores) == workers
    assert threads_per_run(cores, workers) == threads


# runs 1 and 3 end after one epoch, 2 and 4 take eight: a cut made while run 2 trains finds run 1 done
GRID = {"lr": [0.01, 0.02], "epochs": [1, 8]}
SKIP = ("params.yaml", "machine.json", "runs.csv", "runs.json", "log.txt")


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, processed_small) -> Path:
    """The outputs of one uninterrupted sequential sweep of GRID, on every core (the others here run on this
    test worker's share): what every other sweep here must match."""
    out = tmp_path_factory.mktemp("sequential")
    proc = sweep(out, processed_small, 1, GRID, env=WHOLE_MACHINE)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return out


def test_two_workers_write_the_bytes_of_a_sequential_sweep(tmp_path, processed_small, sequential):
    two = sweep(tmp_path / "two", processed_small, 2, GRID)
    assert two.returncode == 0, two.stderr
    assert "Traceback" not in two.stderr and "leaked" not in two.stderr
    # sweep.csv, sweep_best.json, the record of what decided the bits and every run's TensorBoard
    # events, byte for byte
    same_tree(sequential, tmp_path / "two", skip=SKIP)
    assert len(list((tmp_path / "two" / "runs").rglob("*tfevents*"))) == 4
    # the seed's table, in grid order, the same but for its wall-clock columns
    tables = [pd.read_csv(d / "runs" / "runs.csv").drop(columns=TIMINGS) for d in (sequential, tmp_path / "two")]
    pd.testing.assert_frame_equal(*tables)
    assert tables[1]["run"].tolist() == [1, *[2] * 8, 3, *[4] * 8]
    # the machine's record beside the logs: the worker count and each run's threads
    machines = [yaml.safe_load((d / "runs" / "machine.json").read_text()) for d in (sequential, tmp_path / "two")]
    share = runtime.available_cores()  # this test worker's (conftest)
    assert (machines[0]["sweep_workers"], machines[0]["threads"]) == (1, ALL_CORES)
    assert (machines[1]["sweep_workers"], machines[1]["threads"]) == (2, max(1, share // 2))
    # the live table: each worker's rows, numbered and named by run
    rows = [line.split() for line in two.stderr.splitlines() if line.endswith("  lr=0.02,epochs=8")]
    assert [row[:2] for row in rows] == [["4", str(epoch)] for epoch in range(1, 9)]
    assert all(f"sweep run {i}/4: " in two.stderr for i in range(1, 5))
    assert not [line for line in two.stderr.splitlines() if line.count("epochs=") > 1]  # whole lines, never mixed


def test_a_diverged_run_stops_every_worker_with_one_line_and_leaves_no_outputs(tmp_path, processed_small):
    out = tmp_path / "out"
    # run 1 would take hundreds of epochs: it is still training when run 2 diverges in its first
    proc = sweep(out, processed_small, 2, {"lr": [0.01, 1e6], "epochs": [500]})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: sweep run 2/2 (lr=1000000.0,epochs=500): training diverged: ")
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in proc.stderr
    assert "leaked" not in proc.stderr  # no resource_tracker warning from the terminated workers
    assert sorted(p.name for p in out.iterdir()) == ["params.yaml"]  # no metrics, logs, staging folder or state
    assert workers_alive(out) == []
    assert "   1   500 " not in proc.stderr  # run 1 was stopped, not waited for


def test_a_killed_parallel_sweep_takes_its_workers_along_and_redoes_only_unfinished_runs(
        tmp_path, processed_small, sequential):
    cut = tmp_path / "cut"
    proc = sweep(cut, processed_small, 2, GRID, wait=False)
    kill_when(proc, lambda: (cut / "state.pt").exists())  # run 1 finished and recorded
    deadline = time.monotonic() + 10
    while workers_alive(cut):  # the workers die with the sweep (PR_SET_PDEATHSIG), not after their runs
        assert time.monotonic() < deadline, "a worker outlived its killed sweep"
        time.sleep(0.05)
    (cut / "params.yaml").unlink()
    again = sweep(cut, processed_small, 2, GRID)
    assert again.returncode == 0, again.stderr
    assert "sweep run 1/4: lr=0.01,epochs=1: finished earlier" in again.stderr
    assert "   1     1 " not in again.stderr  # run 1 was not trained again
    same_tree(sequential, cut, skip=SKIP)
    assert not (cut / "state.pt").exists()


def test_a_killed_sequential_sweep_redoes_only_unfinished_runs_and_continues_the_one_cut(
        tmp_path, processed_small, sequential):
    cut = tmp_path / "cut"
    proc = sweep(cut, processed_small, 1, GRID, wait=False)
    kill_when(proc, lambda: "   2     2 " in proc.log.read_text())  # run 2's first epoch ended and was saved
    (cut / "params.yaml").unlink()
    again = sweep(cut, processed_small, 1, GRID)
    assert again.returncode == 0, again.stderr
    assert "sweep run 1/4: lr=0.01,epochs=1: finished earlier" in again.stderr
    assert "   1     1 " not in again.stderr and "resumed after epoch" in again.stderr  # run 1 not trained again
    same_tree(sequential, cut, skip=SKIP)
    assert not (cut / "state.pt").exists()


def test_a_parallel_sweep_continues_the_epoch_state_of_an_interrupted_sequential_one(
        tmp_path, processed_small, sequential):
    cut = tmp_path / "cut"
    proc = sweep(cut, processed_small, 1, GRID, wait=False)
    kill_when(proc, lambda: "   2     2 " in proc.log.read_text())  # run 2 is in its epochs
    (cut / "params.yaml").unlink()
    again = sweep(cut, processed_small, 2, GRID)  # the worker count is not part of the state's fingerprint
    assert again.returncode == 0, again.stderr
    assert "finished earlier" in again.stderr and "resumed after epoch" in again.stderr
    same_tree(sequential, cut, skip=SKIP)


def test_sigterm_stops_a_parallel_sweep_and_its_workers_cleanly(tmp_path, processed_small):
    out = tmp_path / "out"
    proc = sweep(out, processed_small, 2, {"lr": [0.01, 0.02], "epochs": [500]}, wait=False)
    deadline = time.monotonic() + 60
    while "   2     1 " not in proc.log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert proc.log.read_text().strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert workers_alive(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "params.yaml"]


class ReverseOrderPool:
    """A stand-in for the worker pool, in this process: with :meth:`wait` in place of concurrent.futures',
    each wait finishes the run submitted last, so that every run completes out of grid order."""

    def __init__(self, workers, mp_context=None, initializer=None, initargs=()):
        self.jobs = {}  # future -> (its submission number, the call it stands for)

    def submit(self, fn, *args):
        future = Future()
        self.jobs[future] = (len(self.jobs), fn, args)
        return future

    def wait(self, pending, return_when):
        last = max(pending, key=lambda f: self.jobs[f][0])
        _, fn, args = self.jobs[last]
        last.set_result(fn(*args))
        return {last}, set(pending) - {last}

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_each_parallel_run_is_recorded_under_its_own_grid_position_whatever_order_they_finish(
        tmp_path, monkeypatch):
    from fmnist import sweep as sweep_module
    from fmnist.tracking import RunBuilder, run_name

    def fake_worker(i, n, values, p, data_dir, staging, threads, resume_state):
        (Path(staging) / run_name(runs[i - 1])).mkdir(parents=True)
        (Path(staging) / run_name(runs[i - 1]) / "events").write_text(f"run {i}")
        return [{"run": i, "name": run_name(runs[i - 1]), "epoch": 1, "loss": i / 10, "accuracy": i / 100,
                 "val_loss": i / 10, "val_accuracy": i / 100, **values}]

    class State:
        def __init__(self):
            self.saves = []

        def save(self, **payload):
            self.saves.append({k: sorted(v) for k, v in payload.items() if k == "finished"})

    runs = RunBuilder.get_runs({"lr": [0.01, 0.02, 0.03]})
    pools = []

    def pool(*args, **kwargs):
        pools.append(ReverseOrderPool(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(sweep_module, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(sweep_module, "wait", lambda pending, return_when: pools[-1].wait(pending, return_when))
    monkeypatch.setattr(sweep_module, "train_in_worker", fake_worker)
    state = State()
    manager = sweep_module._parallel(runs, [None] * 3, tmp_path / "data", tmp_path / "staging", state,
                                     {"finished": {}, "current": None}, workers=3, threads=1)
    assert [s["finished"] for s in state.saves] == [[3], [2, 3], [1, 2, 3]]  # they did finish last first
    assert [(r["run"], r["lr"], r["loss"]) for r in manager.run_data] == [(1, 0.01, 0.1), (2, 0.02, 0.2),
                                                                         (3, 0.03, 0.3)]
    assert [f["params"]["lr"] for f in sweep_module.finals(runs, manager)] == [0.01, 0.02, 0.03]
