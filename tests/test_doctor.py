"""fmnist doctor: versions as installed, next steps for what is missing, FAIL (and exit status 1) only for
what stops the default pipeline. Run in temporary copies of this repository, without data or model."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fmnist import kernels, params, runtime
from fmnist.checkpoint import save_checkpoint
from fmnist.cli import main
from fmnist.extract import FILES
from fmnist.models import build_model

from .e2e import worktree_copy

BIN = Path(sys.executable).parent
FMNIST = BIN / "fmnist"  # the console script pip installed beside this Python
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # dvc from this environment, as activated


def copy_repo(dest: Path, git: bool = True) -> Path:
    """This repository's tracked and unignored files at ``dest``: no data, no model, no DVC cache.

    Where the fused kernel is not built (no C++ compiler), the copy asks for PyTorch's layers, so
    that the kernel's absence, tested on its own below, does not fail every test.
    """
    worktree_copy(dest)
    if git:
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    if not kernels.available():
        set_params(dest, cpu_kernel="torch")
    return dest


def fmnist_doctor(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    assert FMNIST.is_file(), f"{FMNIST}: the fmnist command is not installed (pip install -e .)"
    return subprocess.run([str(FMNIST), "doctor", *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=120)


def run_doctor(repo: Path, capsys) -> tuple[int, str]:
    """``fmnist doctor --repo REPO`` in this process: (exit status, the report)."""
    status = main(["doctor", "--repo", str(repo)])
    out, err = capsys.readouterr()
    assert err == ""
    return status, out


def lines(report: str, state: str) -> list[str]:
    """The report's lines of one state (ok, info, todo, FAIL), without the state."""
    return [m.group(1) for m in re.finditer(rf"^  {re.escape(state)}\s+(.*)$", report, re.M)]


def next_step(report: str, line_start: str) -> str:
    """The ``next:`` line under the check line that starts with ``line_start``."""
    m = re.search(rf"^  \S+\s+{re.escape(line_start)}.*\n        next: (.*)$", report, re.M)
    assert m, f"no next step under {line_start!r} in:\n{report}"
    return m.group(1)


def set_params(repo: Path, **changes) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the repository without data or model, and ``fmnist doctor`` run in it by the real command."""
    repo = copy_repo(tmp_path_factory.mktemp("doctor") / "repo")
    return repo, fmnist_doctor(cwd=repo)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PATH", ENV["PATH"])
    return copy_repo(tmp_path / "repo")


def test_without_data_or_model_it_passes_and_names_the_next_steps(fresh):
    repo, proc = fresh
    assert proc.returncode == 0, proc.stdout
    assert proc.stderr == ""
    report = proc.stdout
    assert report.startswith(f"fmnist doctor: {repo}\n")
    assert lines(report, "FAIL") == []
    assert lines(report, "todo") == [
        "data/raw: missing", "data/processed: missing", "models/model.pt: missing (no trained model)",
        "DVC remote: none (data and models are only on this machine)",
    ]
    assert next_step(report, "data/raw: missing").startswith("run `dvc repro`")
    assert next_step(report, "data/processed: missing") == "run `dvc repro`"
    assert next_step(report, "models/model.pt: missing").startswith("run `dvc repro`")
    assert next_step(report, "DVC remote: none").startswith("`dvc remote add -d storage ")
    assert "params.yaml: valid (model network, 15 epochs" in report
    assert report.endswith("nothing stops the default pipeline; 4 thing(s) to do (todo lines)\n")


def test_versions_printed_are_the_installed_ones(fresh):
    report = fresh[1].stdout
    ok = lines(report, "ok")
    assert f"Python {platform.python_version()} ({sys.executable})" in ok
    for label, dist in (("torch", "torch"), ("torchvision", "torchvision"), ("DVC", "dvc"),
                        ("TensorBoard", "tensorboard"), ("Pillow", "pillow")):
        printed = [line.split()[1].rstrip(";") for line in ok if line.startswith(f"{label} ")]
        assert len(printed) == 1, (label, ok)
        assert printed[0].split("+")[0] == importlib.metadata.version(dist), label  # +cu130: torch's local tag
    assert f"torch {torch.__version__}; a tensor operation runs" in ok
    assert f"fused CPU kernel: {kernels.status()}" in ok + lines(report, "info")
    threads, cores = map(int, re.search(r"threads: torch uses (\d+); (\d+) core\(s\) available", report).groups())
    assert threads >= 1 and cores == runtime.available_cores()


def test_cuda_is_reported_as_it_is(fresh):
    report = fresh[1].stdout
    built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "torch built without CUDA"
    assert built in report
    if torch.cuda.is_available():
        assert f"GPU 0: {torch.cuda.get_device_name(0)}, compute capability" in report
        assert "GiB free" in report
    else:
        assert any(line.startswith("CUDA: no GPU available") for line in lines(report, "info"))


def test_repo_option_checks_another_folder(fresh, tmp_path, capsys, monkeypatch):
    repo, proc = fresh
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", ENV["PATH"])
    status, report = run_doctor(repo, capsys)
    assert status == 0
    assert report.splitlines()[0] == f"fmnist doctor: {repo}"
    assert lines(report, "todo") == lines(proc.stdout, "todo")


def test_outside_the_repository_it_fails_and_says_where_to_run_it(tmp_path, capsys):
    status, report = run_doctor(tmp_path, capsys)
    assert status == 1
    assert lines(report, "FAIL") == [f"{tmp_path}: not the fmnist repository (no dvc.yaml and params.yaml here)"]
    assert "--repo PATH" in next_step(report, str(tmp_path))


def test_a_broken_params_yaml_fails_with_one_line_naming_the_key(repo, capsys):
    set_params(repo, lr=-1)
    status, report = run_doctor(repo, capsys)  # the console script exits with main's status
    assert status == 1
    assert lines(report, "FAIL") == ["params.yaml: lr must be a positive number, got -1"]
    assert "1 problem(s) stop the default pipeline (params.yaml)" in report


@pytest.mark.parametrize("change, key", [
    ({"lrr": 0.1}, "'lrr'"),
    ({"data": {"val_size": 0}}, "data.val_size"),
    ({"sweep": {"tta": [True]}}, "sweep.tta"),
    ({"cpu_kernel": "fast"}, "cpu_kernel"),
])
def test_every_kind_of_params_error_is_one_fail_line(repo, capsys, change, key):
    set_params(repo, **change)
    status, report = run_doctor(repo, capsys)
    failed = lines(report, "FAIL")
    assert status == 1 and len(failed) == 1 and key in failed[0], report


def test_params_yaml_that_is_not_yaml_fails(repo, capsys):
    (repo / "params.yaml").write_text("lr: [0.1\n")
    status, report = run_doctor(repo, capsys)
    assert status == 1
    assert lines(report, "FAIL") == [f"{repo / 'params.yaml'}: not valid YAML (while parsing a flow sequence)"]


def test_fused_kernel_asked_for_but_not_built_fails(repo, capsys, monkeypatch):
    missing = kernels._Library(False, "not built (fmnist._C is missing)",
                               "the fused CPU kernel is not built (needs a C++ compiler); or set cpu_kernel: torch in "
                               "params.yaml")
    monkeypatch.setattr(kernels, "_state", missing)
    set_params(repo, device="cpu", cpu_kernel="fused")
    status, report = run_doctor(repo, capsys)
    assert status == 1
    assert lines(report, "FAIL") == ["params.yaml asks cpu_kernel: fused and the fused CPU kernel is not built "
                                     "(needs a C++ compiler)"]
    assert "cpu_kernel: torch" in next_step(report, "params.yaml asks cpu_kernel: fused")
    assert "fused CPU kernel: not built (fmnist._C is missing)" in lines(report, "info")
    set_params(repo, cpu_kernel="torch")  # the way out it names
    status, report = run_doctor(repo, capsys)
    assert status == 0 and lines(report, "FAIL") == []


def test_portable_numerics_on_a_cpu_without_avx2_fails(repo, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_isa", lambda: ["FMA"])
    status, report = run_doctor(repo, capsys)
    assert status == 1 and len(lines(report, "FAIL")) == 1
    assert next_step(report, "params.yaml asks numerics: portable") == "set numerics: native in params.yaml"
    set_params(repo, numerics="native")
    assert run_doctor(repo, capsys)[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_fails(repo, capsys):
    set_params(repo, device="cuda")
    status, report = run_doctor(repo, capsys)
    assert status == 1
    assert lines(report, "FAIL") == ["params.yaml asks device: cuda and no CUDA GPU is available"]


def test_without_git_dvc_cannot_run_so_it_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", ENV["PATH"])
    repo = copy_repo(tmp_path / "repo", git=False)
    status, report = run_doctor(repo, capsys)
    assert status == 1
    assert lines(report, "FAIL") == [f"{repo} is not in a git repository, which DVC needs"]


def fill(repo: Path) -> None:
    """Stand-ins for what the pipeline makes: the raw files, processed data, a checkpoint of params.yaml's model."""
    (repo / "data" / "raw").mkdir(parents=True)
    for name in FILES:
        (repo / "data" / "raw" / name).write_bytes(b"")
    proc = repo / "data" / "processed"
    proc.mkdir()
    for name in ("train_images", "train_labels", "test_images", "test_labels", "train_idx", "val_idx"):
        (proc / f"{name}.npy").write_bytes(b"")
    (proc / "meta.json").write_text('{"counts": {"train": 55000, "val": 5000, "test": 10000}, '
                                    '"split": {"val_size": 5000, "train_size": null, "split_seed": 0}}')
    p = params.train_params(params.load(repo / "params.yaml"))
    save_checkpoint(repo / "models" / "model.pt", build_model(p.model, cpu_kernel="torch"), p, 0.28, 0.35)


def test_a_complete_repository_has_nothing_to_do_and_stale_outputs_are_named(repo, capsys, tmp_path):
    fill(repo)
    subprocess.run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], cwd=repo, env=ENV,
                   check=True, capture_output=True)
    status, report = run_doctor(repo, capsys)
    assert status == 0 and lines(report, "todo") == [] and lines(report, "FAIL") == [], report
    ok = lines(report, "ok")
    assert "data/raw: the 4 Fashion-MNIST files" in ok
    assert "data/processed: 55000 train, 5000 validation, 10000 test images" in ok
    assert "models/model.pt: network, 15 epochs" in ok
    assert f"DVC remote storage (default): {tmp_path / 'remote'}" in ok
    assert report.endswith("nothing stops the default pipeline\n")

    set_params(repo, lr=0.02, data={"val_size": 4000})
    status, report = run_doctor(repo, capsys)
    assert status == 0
    assert next_step(report, "models/model.pt: network, 15 epochs; params.yaml has since changed lr") == \
        "run `dvc repro` to retrain"
    assert next_step(report, "data/processed: 55000 train") == "run `dvc repro`"

    shutil.rmtree(repo / "data")
    (repo / "models" / "model.pt").write_bytes(b"garbage")
    status, report = run_doctor(repo, capsys)
    assert status == 0
    assert next_step(report, "data/raw: missing").startswith("run `dvc pull`")  # a remote holds them
    assert "dvc checkout models/model.pt" in next_step(report, "models/model.pt: does not load")


def test_a_check_that_raises_is_one_fail_line_naming_the_error_not_a_traceback(repo, capsys, monkeypatch):
    def unreadable():
        raise RuntimeError("cannot read the CPU's name\nsecond line")

    monkeypatch.setattr(runtime, "cpu_model", unreadable)
    status, report = run_doctor(repo, capsys)
    assert status == 1
    assert lines(report, "FAIL") == ["RuntimeError: cannot read the CPU's name"]
    assert "1 problem(s) stop the default pipeline (CPU)" in report


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        main(["doctor", "--help"])
    assert info.value.code == 0
    assert "examples:\n  fmnist doctor\n  fmnist doctor --repo" in capsys.readouterr().out


def test_bfloat16_on_the_cpu_needs_native_numerics_and_is_flagged_without_native_instructions(
        repo, capsys, monkeypatch):
    set_params(repo, device="cpu", precision="bfloat16")
    status, report = run_doctor(repo, capsys)
    assert status == 1 and len(lines(report, "FAIL")) == 1
    assert next_step(report, "params.yaml asks precision: bfloat16") == \
        "set numerics: native, or precision: auto, in params.yaml"
    set_params(repo, numerics="native")
    monkeypatch.setattr(runtime, "cpu_isa", lambda: ["AVX2", "FMA", "AVX512F", "AVX512_BF16"])
    status, report = run_doctor(repo, capsys)
    assert status == 0 and "AVX512_BF16 nor AMX" not in report
    monkeypatch.setattr(runtime, "cpu_isa", lambda: ["AVX2", "FMA", "AVX512F"])
    status, report = run_doctor(repo, capsys)
    assert status == 0 and "neither AVX512_BF16 nor AMX" in " ".join(lines(report, "info"))
    assert next_step(report, "params.yaml asks precision: bfloat16 and") == \
        "compare with precision: auto (float32 on the CPU)"


def test_a_model_deleted_by_a_failed_experiment_is_restored_from_the_cache_not_retrained(repo, capsys):
    """DVC removes a stage's outputs before running it: after `dvc exp run` fails, the locked model is still cached."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.pt")
    cached = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"the model")
    status, report = run_doctor(repo, capsys)
    assert "models/model.pt: missing, but DVC's cache holds the one dvc.lock names" in lines(report, "todo")
    assert next_step(report, "models/model.pt: missing").startswith("run `dvc checkout models/model.pt`")
    cached.unlink()
    status, report = run_doctor(repo, capsys)
    assert next_step(report, "models/model.pt: missing").startswith("run `dvc repro`")
