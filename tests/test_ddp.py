"""Data-parallel training: N processes on torch.distributed (gloo here) against one process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from fmnist import runtime
from fmnist.data import transform
from fmnist.distributed import World
from fmnist.params import DataParams

from .conftest import ALL_CORES, ROOT, WHOLE_MACHINE, free_port, outputs, running


@pytest.fixture(scope="module")
def small(raw_full, tmp_path_factory) -> Path:
    """2,000 training images of the real data: 20 steps of 100 per epoch."""
    out = tmp_path_factory.mktemp("ddp") / "processed"
    transform(raw_full, out, DataParams(train_size=2000, val_size=500))
    return out


def params_file(folder: Path, **values) -> Path:
    path = folder / f"params-{len(list(folder.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def command(data: Path, params: Path, out: Path) -> list[str]:
    return [str(ROOT / "stages" / "train.py"), "--data", str(data), "--params", str(params),
            *outputs("train", out, state="state.pt")]


def train(data: Path, params: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command(data, params, out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def checkpoint(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)


def weights(out: Path) -> dict:
    return checkpoint(out)["state_dict"]


def test_shards_are_equal_and_cover_the_batch_once():
    for n, size in ((100, 2), (100, 3), (7, 4), (1, 2)):
        parts = [range(n)[World(rank, size).shard(n)] for rank in range(size)]
        assert [i for part in parts for i in part] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


class TwoProcesses(NamedTuple):
    params: Path  # 1 epoch, 2 processes
    out: Path     # what they wrote
    stderr: str


@pytest.fixture(scope="module")
def two(small, tmp_path_factory) -> TwoProcesses:
    """One epoch trained by 2 local processes given every core to share, for the tests that compare other
    ways of training with it."""
    folder = tmp_path_factory.mktemp("two")
    params = params_file(folder, epochs=1, processes=2)
    proc = train(small, params, folder / "out", env=WHOLE_MACHINE)
    assert proc.returncode == 0, proc.stderr
    return TwoProcesses(params, folder / "out", proc.stderr)


def test_two_processes_train_the_weights_of_one(small, two, tmp_path):
    one = train(small, params_file(tmp_path, epochs=1, processes=1), tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a, b = weights(tmp_path / "one"), weights(two.out)
    # The same global batches, images and flips; only the float sums differ in order (each process
    # sums its half, then gloo adds the halves): a few units in the last place per step. After this
    # epoch's 20 steps they measured 1.5e-8 at most (relative 3e-7); over hundreds of steps the
    # difference grows like any rounding difference in training, so the test stops at 20.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    m1, m2 = (checkpoint(d)["metrics"] for d in (tmp_path / "one", two.out))
    assert m2["train_accuracy"] == m1["train_accuracy"] and m2["val_accuracy"] == m1["val_accuracy"]
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-6)
    # only rank 0 wrote: one table, one log folder, no state left
    assert two.stderr.count("   1     1 ") == 1
    assert sorted(p.name for p in two.out.iterdir()) == ["model.pt", "runs"]


def test_two_nodes_through_c10d_rendezvous_train_as_two_local_processes(small, two, tmp_path):
    """Two torchrun "nodes" of one process each on localhost meet through c10d, as two machines would."""
    params = two.params
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fmnist-test"]
    nodes = [subprocess.Popen([*torchrun, *command(small, params, tmp_path / "nodes")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    a, b = weights(two.out), weights(tmp_path / "nodes")  # against 2 local processes
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same two shards, the same sums: the same bits


def ranks(needle: str) -> dict[int, int]:
    """{rank: pid} of the running training processes a launcher started, whose command line contains ``needle``."""
    return {int(proc.env["RANK"]): proc.pid for proc in running(needle) if "RANK" in proc.env}


def test_a_process_that_dies_stops_the_others_with_one_line_and_no_outputs(small, tmp_path):
    params = params_file(tmp_path, epochs=30, processes=2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *command(small, params, out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "state.pt").exists():  # rank 0 finished an epoch: both are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    started = ranks(str(params))  # this run's: its params file is this test's own
    assert sorted(started) == [0, 1]
    os.kill(started[1], signal.SIGKILL)
    start = time.monotonic()
    err = proc.communicate(timeout=120)[1]
    assert time.monotonic() - start < 60  # no hang in a collective
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == ("error: training process 1 of 2 failed (signal SIGKILL); the others "
                                            "were stopped (its own message, if any, is above)")
    assert "Traceback" not in err
    assert not (out / "model.pt").exists() and not (out / "runs" / "train").exists()
    assert not ranks(str(params))  # rank 0 is gone too


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_stop_signal_ends_a_data_parallel_train_as_it_ends_one_process(small, tmp_path, sig, status, name):
    """Ctrl-C (the terminal signals the whole process group) or SIGTERM to the stage alone (dvc, kill):
    its status, one line, no traceback, every process gone, and a resume state the next run continues from."""
    params = params_file(tmp_path, epochs=6, processes=2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *command(small, params, out)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "state.pt").exists():  # rank 0 finished an epoch: both are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == status, err
    assert err.strip().splitlines()[-1] == f"interrupted ({name})" and err.count("interrupted") == 1, err
    assert "Traceback" not in err and "SignalException" not in err, err
    assert not ranks(str(params))
    assert not (out / "model.pt").exists() and (out / "state.pt").exists()
    if sig == signal.SIGTERM:
        again = train(small, params, out)
        assert again.returncode == 0, again.stderr
        assert "resumed after epoch" in again.stderr


def test_each_process_takes_its_share_of_the_cores(two):
    machine = yaml.safe_load((two.out / "runs" / "train" / "machine.json").read_text())
    assert machine["threads"] == max(1, ALL_CORES // 2)


def test_two_processes_killed_resume_to_the_bits_of_an_uninterrupted_run(small, tmp_path):
    """kill -9 of the launcher and both processes (a power cut); the rerun continues from rank 0's state."""
    params = params_file(tmp_path, epochs=8, processes=2)
    whole = train(small, params, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen([sys.executable, *command(small, params, tmp_path / "cut")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "cut" / "state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    for pid in [proc.pid, *ranks(str(params)).values()]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    again = train(small, params, tmp_path / "cut")
    assert again.returncode == 0, again.stderr
    assert "resumed after epoch" in again.stderr and "resumed after epoch 8" not in again.stderr
    a, b = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "cut")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (b["metrics"], b["history"]) == (a["metrics"], a["history"])


def test_fastnet_batchnorm_on_the_cpu_keeps_rank_0s_statistics(small, tmp_path):
    """On the CPU (gloo) BatchNorm is not synchronised: the saved running mean is rank 0's shard's, not the batch's."""
    from fmnist.data import load_processed
    from fmnist.engine import to_device
    from fmnist.models import build_model

    params = params_file(tmp_path, model="fastnet", epochs=1, batch_size=2000, processes=2, lr=0.01)
    two = train(small, params, tmp_path / "two")
    assert two.returncode == 0, two.stderr
    saved = weights(tmp_path / "two")["features.0.2.running_mean"]

    data = load_processed(small)
    x = to_device(data.train, data.mean, data.std, torch.device("cpu")).x
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # the run's one batch, seed 0

    def running_mean_after_one_batch(images):
        model = build_model("fastnet", 16, seed=0).to(memory_format=torch.channels_last).train()
        with torch.no_grad():
            model(images)
        return model.features[0][2].running_mean

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, runtime.available_cores() // 2))  # each process's, as they ran (oneDNN's
    try:                                                                # sums depend on it)
        shard0 = running_mean_after_one_batch(x[order[:1000]])
        whole = running_mean_after_one_batch(x[order])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(saved, shard0, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(saved, whole, rtol=1e-3, atol=1e-4)

    # the validation figures reported are those of the saved model, rank 0's statistics included
    from fmnist.checkpoint import load_checkpoint
    from fmnist.engine import evaluate

    model, info = load_checkpoint(tmp_path / "two" / "model.pt")
    val = to_device(data.val, data.mean, data.std, torch.device("cpu"))
    val_loss, val_accuracy, _ = evaluate(model, val)
    assert info["metrics"]["val_accuracy"] == val_accuracy
    # sharded sums differ from one process's in the last bits only; rank 1's own statistics move it more
    assert info["metrics"]["val_loss"] == pytest.approx(val_loss, rel=5e-7)
