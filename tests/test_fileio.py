"""fileio: outputs appear whole or not at all, temporaries name their process, errors name the target."""

import errno
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmnist import fileio
from fmnist.errors import OutputError, Terminated
from fmnist.fileio import atomic_dir, atomic_path, remove_stale_temps, write_csv, write_json

from .conftest import ROOT


def temps(folder):
    return sorted(p.name for p in folder.rglob(".*.tmp"))


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()  # reaped: the pid now names no process
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_atomic_path_writes_a_temporary_named_after_the_target_and_this_process(tmp_path):
    target = tmp_path / "m.pt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert re.fullmatch(rf"\.m\.pt\.{os.getpid()}\.[a-z0-9_]+\.tmp", tmp.name)
        assert not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert temps(tmp_path) == []


def test_atomic_path_failing_half_way_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "m.pt"
    target.write_text("old content")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_path(target) as tmp, open(tmp, "w") as f:
            f.write("new con")
            f.flush()
            raise RuntimeError("failed half-way")
    assert target.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_atomic_path_interrupted_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("ne")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_dir_failing_half_way_keeps_the_old_folder_and_leaves_no_staging(tmp_path):
    target = tmp_path / "processed"
    with atomic_dir(target) as staging:
        (staging / "a.npy").write_text("old a")
        (staging / "b.npy").write_text("old b")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staging:
            assert staging.parent == tmp_path and staging != target and not any(staging.iterdir())
            (staging / "a.npy").write_text("new a")
            raise RuntimeError("failed after the first file")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.npy": "old a", "b.npy": "old b"}
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]


def test_atomic_dir_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "processed"
    target.mkdir()
    (target / "stale.npy").write_text("old")
    with atomic_dir(target) as staging:
        (staging / "fresh.npy").write_text("new")
    assert [p.name for p in target.iterdir()] == ["fresh.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]


def test_a_write_error_without_a_file_name_names_the_target(tmp_path):
    target = tmp_path / "processed"
    with pytest.raises(OutputError) as info:
        with atomic_dir(target) as staging:
            (staging / "a.npy").write_text("partial")
            raise OSError("1568000 requested and 1048448 written")  # what numpy says on a short write
    assert str(info.value) == f"{target}: cannot write (1568000 requested and 1048448 written)"
    assert not target.exists() and temps(tmp_path) == []


def test_a_write_error_inside_the_staging_folder_names_the_file_under_the_target(tmp_path):
    target = tmp_path / "processed"
    with pytest.raises(OutputError) as info:
        with atomic_dir(target) as staging:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "train_images.npy"))
    assert str(info.value) == f"{target / 'train_images.npy'}: cannot write (No space left on device)"
    assert isinstance(info.value.__cause__, OSError)


def test_a_nested_write_error_names_the_final_path_not_the_staging_folder(tmp_path):
    target = tmp_path / "runs"
    with pytest.raises(OutputError) as info:
        with atomic_dir(target) as staging, atomic_path(staging / "a" / "h.csv"):
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    assert str(info.value) == f"{target / 'a' / 'h.csv'}: cannot write (File too large)"
    assert temps(tmp_path) == []


def test_a_checkpoint_that_outgrows_the_file_size_limit_is_one_error_naming_it(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"old checkpoint")
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))  # this process, for the one write below
    try:
        with pytest.raises(OutputError) as info:
            with atomic_path(target) as tmp, open(tmp, "wb") as f:  # as checkpoint.save_checkpoint does
                torch.save({"w": torch.zeros(1 << 19)}, f)  # 2 MB; torch says RuntimeError, from an OSError
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(info.value) == f"{target}: cannot write (File too large)"
    assert target.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_a_runtime_error_not_caused_by_a_failed_write_keeps_its_traceback(tmp_path):
    with pytest.raises(RuntimeError, match="shape"), atomic_path(tmp_path / "m.pt"):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="no cache"), atomic_path(tmp_path / "m.pt"):
        try:
            open(tmp_path / "cache.bin")  # another file than the output
        except OSError:
            raise RuntimeError("no cache")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_errors_that_are_not_about_the_output_pass_through_unchanged(tmp_path):
    missing_input = tmp_path / "raw" / "x.gz"
    with pytest.raises(FileNotFoundError) as info, atomic_path(tmp_path / "out.json"):
        open(missing_input)  # an input, not the output: its own name is the useful one
    assert info.value.filename == str(missing_input)
    with pytest.raises(ConnectionResetError), atomic_path(tmp_path / "out.json"):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    with pytest.raises(ValueError), atomic_dir(tmp_path / "d"):
        raise ValueError("a bug keeps its traceback")
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("err", [
    PermissionError(errno.EACCES, "Permission denied"),
    OSError(errno.EROFS, "Read-only file system"),
])
def test_a_refused_rename_is_one_error_naming_the_target_and_keeps_the_old_file(tmp_path, monkeypatch, err):
    target = tmp_path / "m.pt"
    target.write_text("old")

    def refuse(src, dst):
        raise type(err)(err.errno, err.strerror, str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError) as info:
        write_json(target, {"a": 1})
    assert str(info.value) == f"{target}: cannot write ({err.strerror})"
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_a_folder_that_cannot_be_created_is_one_error_naming_the_target(tmp_path):
    (tmp_path / "data").write_text("a file where a folder should be")
    with pytest.raises(OutputError, match=rf"^{re.escape(str(tmp_path / 'data' / 'processed'))}: cannot write \("):
        with atomic_dir(tmp_path / "data" / "processed"):
            pass


def test_atomic_dir_puts_the_old_folder_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    target = tmp_path / "processed"
    target.mkdir()
    (target / "a.npy").write_text("old")
    real_replace, staged = os.replace, []

    def refuse_the_staging_folder(src, dst):
        if staged and str(src) == str(staged[0]):
            raise OSError(errno.EROFS, "Read-only file system", str(src), None, str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_staging_folder)
    with pytest.raises(OutputError, match="cannot write \\(Read-only file system\\)"):
        with atomic_dir(target) as staging:
            staged.append(staging)
            (staging / "a.npy").write_text("new")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.npy": "old"}
    assert temps(tmp_path) == []


def test_temporaries_of_dead_processes_are_removed_and_those_of_live_ones_kept(tmp_path, dead_pid, live_pid):
    dead_dir = tmp_path / f".train.{dead_pid}.ab12_xyz.tmp"
    (dead_dir / "sub").mkdir(parents=True)
    (dead_dir / "sub" / "events").write_text("x")
    dead_file = tmp_path / f".train.{dead_pid}.k3j4h5g6.tmp"
    dead_file.write_text("x")
    kept = [
        tmp_path / f".train.{live_pid}.ab12_xyz.tmp",  # a concurrent writer
        tmp_path / f".train.{os.getpid()}.ab12_xyz.tmp",  # this process
        tmp_path / f".sweep.{dead_pid}.ab12_xyz.tmp",  # another target's
        tmp_path / f".train.{dead_pid}.tmp",  # not the exact pattern
        tmp_path / f".train.{dead_pid}.ab12xyz.tmp.bak",
        tmp_path / f"train.{dead_pid}.ab12xyz.tmp",
        tmp_path / ".train.ab12_xyz.tmp",  # made before temporaries carried a pid: owner unknown
    ]
    for p in kept:
        p.mkdir()
    with atomic_dir(tmp_path / "train") as staging:
        (staging / "events").write_text("new")
    assert not dead_dir.exists() and not dead_file.exists()
    assert all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train", *(p.name for p in kept)])


def test_atomic_path_removes_its_targets_dead_temporaries_only(tmp_path, dead_pid, live_pid):
    dead, live = tmp_path / f".m.pt.{dead_pid}.abcdefgh.tmp", tmp_path / f".m.pt.{live_pid}.abcdefgh.tmp"
    other = tmp_path / f".m.pt.bak.{dead_pid}.abcdefgh.tmp"  # the temporary of a target named m.pt.bak
    for p in (dead, live, other):
        p.write_text("partial")
    with atomic_path(tmp_path / "m.pt") as tmp:
        tmp.write_text("new")
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temps(tmp_path / "m.pt.bak") == [other]


def test_git_and_dvc_ignore_the_temporaries():
    paths = ["data/.processed.4242.ab12_xyz.tmp", "runs/.train.4242.ab12_xyz.tmp/events.out.tfevents.1",
             "models/.model.pt.4242.abcdefgh.tmp", "data/.processed.ab12_xyz.tmp"]
    kept = ["src/fmnist/fileio.py", "data/raw.tmp"]
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not in a git checkout")
    for p in paths:
        assert subprocess.run([git, "check-ignore", "-q", p], cwd=ROOT).returncode == 0, p
    for p in kept:
        assert subprocess.run([git, "check-ignore", "-q", "--no-index", p], cwd=ROOT).returncode == 1, p

    dvc = shutil.which("dvc", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if dvc is None:
        pytest.skip("dvc is not installed")
    proc = subprocess.run([dvc, "check-ignore", "--details", "--non-matching", *paths, *kept], cwd=ROOT,
                          capture_output=True, text=True)
    ignored = {line.split("\t")[-1] for line in proc.stdout.splitlines() if not line.startswith("::")}
    assert ignored == set(paths), proc.stdout + proc.stderr



def test_write_csv_writes_the_bytes_of_pandas_to_csv(tmp_path):
    import pandas as pd

    rows = [{"epoch": 1, "loss": 0.1 + 0.2, "accuracy": 1 / 3, "val_loss": None, "val_accuracy": 1e-05, "extra": "x"},
            {"epoch": 2, "loss": 2.5e-17, "accuracy": 0.9120000004768372, "val_loss": 1.0, "val_accuracy": 123456.789,
             "extra": "y"}]
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    write_csv(tmp_path / "ours.csv", rows, columns)
    pd.DataFrame.from_records(rows, columns=columns).to_csv(tmp_path / "pandas.csv", index=False)
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    names = [{"actual": "T-shirt/top", "predicted": "Ankle boot"}]
    write_csv(tmp_path / "names.csv", names, ["actual", "predicted"])
    pd.DataFrame(names).to_csv(tmp_path / "names_pandas.csv", index=False)
    assert (tmp_path / "names.csv").read_bytes() == (tmp_path / "names_pandas.csv").read_bytes()
    # without columns: every key in order of first appearance, a row's missing ones empty (a sweep's table)
    runs = [{"run": 1, "lr": 0.01}, {"run": 2, "lr": 0.02, "width": 8.0}, {"width": 16.0, "run": 3, "lr": None}]
    write_csv(tmp_path / "runs.csv", runs)
    pd.DataFrame.from_records(runs).to_csv(tmp_path / "runs_pandas.csv", index=False)
    assert (tmp_path / "runs.csv").read_bytes() == (tmp_path / "runs_pandas.csv").read_bytes()


class _StoppedWhileWriting(io.RawIOBase):
    """A file that a stop signal interrupts at its third write, as SIGTERM can interrupt torch.save."""

    def __init__(self, file, stop: BaseException):
        self.file, self.stop, self.writes = file, stop, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.writes += 1
        if self.writes == 3:
            raise self.stop
        return self.file.write(b)


@pytest.mark.parametrize("stop", [Terminated(15), KeyboardInterrupt()], ids=["SIGTERM", "SIGINT"])
def test_a_stop_inside_torch_save_stops_as_itself_and_leaves_nothing(tmp_path, stop):
    # torch.save's zip writer fails on the half-written record ("unexpected pos") while the stop
    # propagates; the stage must still see the stop (exit 143 or 130), not a RuntimeError
    with pytest.raises(type(stop)):
        with atomic_path(tmp_path / "state.pt") as tmp, open(tmp, "wb") as f:
            torch.save({"weights": torch.zeros(1000)}, _StoppedWhileWriting(f, stop))
    assert list(tmp_path.iterdir()) == []



def test_the_umask_is_read_without_being_set(monkeypatch):
    """os.umask sets the mask for every thread while it reads it: a file another thread creates meanwhile gets 0666."""
    mask = os.umask(0o027)
    os.umask(mask)
    monkeypatch.setattr(os, "umask", lambda _: pytest.fail("os.umask called"))
    assert fileio._umask() == mask


def test_bytes_and_names_reach_the_disk_around_each_rename(monkeypatch, tmp_path):
    """After a power cut the target holds the old output or the new one, never a name without its bytes:
    every file and folder written is flushed before the rename, and the folder holding the name after it."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))

    fileio.write_text(tmp_path / "m.json", "{}")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert re.fullmatch(r"\.m\.json\.\d+\..+\.tmp", Path(events[0][1]).name)
    assert events[1:] == [("replace", str(tmp_path / "m.json")), ("fsync", str(tmp_path))]

    events.clear()
    with atomic_dir(tmp_path / "runs") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "events").write_bytes(b"x")
    assert events[:3] == [("fsync", str(staging / "sub" / "events")), ("fsync", str(staging / "sub")),
                          ("fsync", str(staging))]
    assert events[-2:] == [("replace", str(tmp_path / "runs")), ("fsync", str(tmp_path))]
