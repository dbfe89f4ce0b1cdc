"""Resuming: a train or sweep killed with SIGKILL and run again ends with the bits of a run never interrupted."""

import filecmp
import io
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from fmnist import resume

from .conftest import ROOT, running
from .e2e import ENV, SMALL, repo_copy, set_params, sh

POLL = 0.02  # seconds between looks at a running stage


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be interrupted: give it more epochs"
        assert time.monotonic() < deadline, "the run never reached the point to interrupt it at"
        time.sleep(POLL)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def same_tree(a: Path, b: Path, skip=()) -> None:
    """Every file under ``a`` and ``b`` has the same bytes, and there are the same files."""
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and p.name not in skip)
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name not in skip)
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_state_made_with_other_params_data_code_or_environment_is_not_used(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.npy").write_bytes(b"images")
    script = tmp_path / "train.py"
    script.write_text("# stage\n")
    env = {"torch": "2.14.1", "aten_cpu_capability": "AVX2", "thread_independent": True}

    def fingerprint(lr=0.05, **changes):
        return resume.fingerprint({"lr": lr, "epochs": 3}, data, script, {**env, **changes})

    resume.SavedState(tmp_path / "s.pt", fingerprint()).save(run={"epoch": 1})
    assert resume.SavedState(tmp_path / "s.pt", fingerprint()).load()["run"] == {"epoch": 1}

    caplog.set_level(logging.WARNING)
    assert resume.SavedState(tmp_path / "s.pt", fingerprint(lr=0.02)).load() is None
    assert "the parameters changed (lr 0.05 -> 0.02)" in caplog.text

    # another torch, instruction set or (where the bits depend on it) thread count: other bits
    for changes, key in (({"torch": "2.15.0"}, "torch"), ({"aten_cpu_capability": "AVX512"}, "aten_cpu_capability"),
                         ({"thread_independent": False, "threads": 4}, "thread_independent, threads")):
        caplog.clear()
        assert resume.SavedState(tmp_path / "s.pt", fingerprint(**changes)).load() is None
        assert f"what decides the bits changed ({key}:" in caplog.text

    (data / "train.npy").write_bytes(b"imageZ")
    assert resume.SavedState(tmp_path / "s.pt", fingerprint()).load() is None
    assert "the processed data changed" in caplog.text

    (data / "train.npy").write_bytes(b"images")
    script.write_text("# stage, edited\n")
    assert resume.SavedState(tmp_path / "s.pt", fingerprint()).load() is None
    assert "the code changed" in caplog.text

    (tmp_path / "s.pt").write_bytes(b"not a state")
    assert resume.SavedState(tmp_path / "s.pt", fingerprint()).load() is None  # a damaged file: start fresh, say so
    assert "not a readable resume state" in caplog.text


@pytest.mark.parametrize("stage", yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
def test_a_stages_code_deps_in_dvc_yaml_are_the_modules_it_imports(stage):
    """What DVC reruns a stage for is what its resume state is tied to: the script and the modules it runs."""
    script = ROOT / "stages" / f"{stage}.py"
    sources = {p.relative_to(ROOT).as_posix() for p in resume.stage_sources(script)}
    declared = {d for d in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
                if d.startswith(("src/", "stages/"))}
    kernel = {s for s in sources if s.startswith("src/fmnist/csrc/")}
    assert declared == sources - kernel | ({"src/fmnist/csrc"} if kernel else set())
    if stage in ("train", "sweep"):
        assert {"src/fmnist/engine.py", "src/fmnist/models.py", "src/fmnist/csrc/convpool.cpp"} <= sources
    # the fmnist command's modules change no stage's results
    assert not sources & {"src/fmnist/cli.py", "src/fmnist/predict.py", "src/fmnist/doctor.py", "src/fmnist/serve.py"}


def test_snapshot_restores_a_folder_and_refuses_names_outside_it(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)))
    (src / "sub" / "empty").write_bytes(b"")
    files = resume.snapshot(src)
    resume.restore(tmp_path / "dst", files)
    same_tree(src, tmp_path / "dst")
    with pytest.raises(ValueError, match="unsafe"):
        resume.restore(tmp_path / "dst", {"../escape": torch.zeros(1, dtype=torch.uint8)})
    assert not (tmp_path / "escape").exists()


@pytest.mark.e2e
def test_dvc_repro_after_kill_resumes(mirror, tmp_path):
    """Under DVC: the train stage killed mid-run; the next ``dvc repro`` continues it and records the outputs of an
    uninterrupted run, the checkpoint and the TensorBoard logs (their hashes in dvc.lock) bit for bit."""
    repo = repo_copy(tmp_path / "repo", mirror)
    set_params(repo, **{**SMALL, "data": {**SMALL["data"], "train_size": 20000}, "epochs": 3})
    sh(repo, "git", "commit", "-qam", "params")
    sh(repo, "dvc", "repro", "transform")
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = repo / ".resume" / "train.pt"
    deadline = time.monotonic() + 120
    while not state.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "train ended before it could be interrupted"
        time.sleep(POLL)
    trainers = [proc.pid for proc in running("stages/train.py") if proc.cwd == repo]
    assert trainers
    for pid in trainers:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    saved = torch.load(state, weights_only=True)["run"]["epoch"]  # the last epoch finished

    resumed = sh(repo, "dvc", "repro", "train")
    assert f"resumed after epoch {saved}\n" in resumed.stdout + resumed.stderr  # only the epoch cut short is redone
    assert not state.exists()
    lock = (repo / "dvc.lock").read_text()
    model = (repo / "models" / "model.pt").read_bytes()
    sh(repo, "dvc", "repro", "-f", "-s", "train")  # the same stage, uninterrupted
    assert (repo / "dvc.lock").read_text() == lock  # every output's hash, the model's and the logs' included
    a = torch.load(repo / "models" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(io.BytesIO(model), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
