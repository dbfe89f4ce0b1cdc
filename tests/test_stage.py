"""stage.run and the stages under faults: one line and exit status 1 for a file-system error, 130/143
for SIGINT/SIGTERM, and no temporary file or folder left behind, even after kill -9."""

import ctypes
import errno
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fmnist import stage
from fmnist.errors import DataError

from .conftest import ROOT, outputs, write_raw

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


def stage_cmd(name, *args):
    return [sys.executable, str(ROOT / "stages" / f"{name}.py"), *map(str, args)]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def exit_status(main) -> int:
    with pytest.raises(SystemExit) as info:
        stage.run(main)
    return info.value.code


# stage.run in this process


def test_a_pipeline_error_is_one_line_and_status_1(capsys):
    def main():
        raise DataError("data/raw/x.gz: file not found")

    assert exit_status(main) == 1
    assert capsys.readouterr().err == "error: data/raw/x.gz: file not found\n"


def test_an_operation_without_a_deterministic_implementation_is_refused_in_one_line():
    """Where the same bits are promised, PyTorch's nondeterministic operations are errors, not warnings."""
    code = ("import torch\nfrom fmnist import stage\nfrom fmnist.runtime import make_deterministic\n"
            "def main():\n    make_deterministic()\n"
            "    torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))\n"
            "stage.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == ["error: put_ has no deterministic implementation in PyTorch on this device, "
                                        "so the run could not give the same bits twice: it is refused"]


def test_an_os_error_is_one_line_naming_the_file_and_status_1(capsys):
    def main():
        raise PermissionError(errno.EACCES, "Permission denied", "models/model.pt")

    assert exit_status(main) == 1
    assert capsys.readouterr().err == "error: models/model.pt: Permission denied\n"


def test_a_programming_error_keeps_its_traceback():
    def main():
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        stage.run(main)


SELF_TERMINATING = """
import os, signal, sys, time
from fmnist import stage

sig = signal.Signals[sys.argv[1]]
signal.signal(sig, signal.SIG_DFL)  # as in a terminal: a test run under nohup would pass SIGHUP ignored

def main():
    try:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts the sleep
    except Exception:  # a library's catch-all must not swallow the stop
        pass
    print("still running after", sig.name)

before = signal.getsignal(sig)
try:
    stage.run(main)
finally:
    print("handler put back:", signal.getsignal(sig) == before)
"""


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_gets_past_except_exception_and_ends_with_128_plus_its_number(name, status):
    proc = subprocess.run([sys.executable, "-c", SELF_TERMINATING, name], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr, proc.stdout) == (status, f"interrupted ({name})\n", "handler put back: True\n")


def test_an_ignored_sigterm_stays_ignored(capsys):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup-like supervisors
    try:
        stage.run(lambda: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == ""


# real stages in subprocesses


def test_a_full_disk_during_transform_is_one_line_and_keeps_the_old_output(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"val_size": 100}}))
    out = tmp_path / "data" / "processed"
    write_raw(tmp_path / "raw", n_train=200, n_test=30)
    cmd = stage_cmd("transform", "--raw", tmp_path / "raw", "--out", out, "--params", tmp_path / "params.yaml")
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    before = digests(out)

    write_raw(tmp_path / "raw", n_train=2000, n_test=30)  # train_images.npy: 1.5 MB

    def one_megabyte_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=one_megabyte_files)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {out}"), proc.stderr
    assert "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert digests(out) == before
    assert leftovers(tmp_path) == []


def without_permission_override():
    """In the child, before exec: drop the capabilities that let root write where the mode says no."""
    if os.geteuid() != 0:
        return  # an ordinary user is refused by the folder's mode already
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:  # root gets the bounding set back at exec
            raise OSError(ctypes.get_errno(), "cannot drop a capability")


def test_a_folder_the_stage_may_not_write_is_one_line(tmp_path):
    write_raw(tmp_path / "raw")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"val_size": 20}}))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "processed"
    cmd = stage_cmd("transform", "--raw", tmp_path / "raw", "--out", out, "--params", tmp_path / "params.yaml")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=without_permission_override)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot run a child without root's permission override here: {e}")
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"error: {out}: cannot write (Permission denied)\n"
    assert list(locked.iterdir()) == []


def train_cmd(tmp_path, data, epochs):
    params = tmp_path / f"params-{epochs}.yaml"
    params.write_text(yaml.safe_dump({"epochs": epochs, "batch_size": 100, "cpu_kernel": "torch"}))
    out = tmp_path / "out"
    return stage_cmd("train", "--data", data, "--params", params, *outputs("train", out, model="m.pt"))


class Running:
    """A stage in a subprocess whose stderr is collected as it comes."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even under `&`
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_until(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"the stage never got to {what}: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return "".join(self.lines)


def start_training(cmd, runs: Path) -> tuple[Running, Path]:
    """Start train and return once it is inside its epochs, writing TensorBoard logs to its staging folder."""
    running = Running(cmd)
    running.wait_until(lambda: runs.is_dir() and any(runs.glob(".train.*.tmp")), "its staging folder")
    running.wait_until(lambda: any(re.match(r"\s+1\s+1\s", line) for line in list(running.lines)), "its first epoch")
    return running, next(runs.glob(".train.*.tmp"))


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_stops_train_with_its_status_and_leaves_no_temporary(tmp_path, processed_small, sig, status, name):
    out = tmp_path / "out"
    running, staging = start_training(train_cmd(tmp_path, processed_small, epochs=500), out / "runs")
    running.proc.send_signal(sig)
    err = running.stderr()
    assert running.proc.returncode == status, err
    assert err.splitlines()[-1] == f"interrupted ({name})"
    assert "Traceback" not in err
    assert not staging.exists()
    assert leftovers(out) == [] and not (out / "runs" / "train").exists() and not (out / "m.pt").exists()


def test_after_kill_9_the_next_run_removes_the_dead_runs_staging_folder_only(tmp_path, processed_small):
    out = tmp_path / "out"
    killed, staging = start_training(train_cmd(tmp_path, processed_small, epochs=500), out / "runs")
    killed.proc.kill()  # SIGKILL: no handler, no finally
    killed.stderr()  # reaped, as a shell or dvc would
    assert staging.is_dir()  # what the user found
    # ...and what `tensorboard --logdir runs` showed while it trained: the staging folder is one of its runs,
    # with the finished epochs' curves
    from tensorboard.backend.event_processing import io_wrapper
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert str(staging) in io_wrapper.GetLogdirSubdirectories(str(out / "runs"))
    assert len(EventAccumulator(str(staging)).Reload().Scalars("Loss/train")) >= 1

    other = subprocess.Popen(["sleep", "60"])  # stands for a concurrent writer of the same target
    try:
        live = out / "runs" / f".train.{other.pid}.abcdefgh.tmp"
        live.mkdir()
        proc = subprocess.run(train_cmd(tmp_path, processed_small, epochs=1), capture_output=True, text=True)
        assert live.is_dir()
    finally:
        other.kill()
        other.wait()
    assert proc.returncode == 0, proc.stderr
    assert f"removed {staging}, left by process {killed.proc.pid}" in proc.stderr
    assert leftovers(out) == [live.relative_to(out).as_posix()]
    assert (out / "runs" / "train").is_dir() and (out / "m.pt").is_file()


def test_the_exceptions_behind_a_one_line_error_are_logged_and_shown_when_verbose(tmp_path):
    code = ("from fmnist import stage\nfrom fmnist.errors import DataError\n"
            "def main():\n    try:\n        {}['deep']\n    except KeyError:\n"
            "        raise DataError('m.pt: not a checkpoint') from None\n"
            "stage.run(main)\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    env.pop("FMNIST_VERBOSE", None)
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert (quiet.returncode, quiet.stderr) == (1, "error: m.pt: not a checkpoint\n")
    log = (tmp_path / "fmnist" / "last-error.log").read_text()
    assert "error: m.pt: not a checkpoint" in log and "KeyError: 'deep'" in log and "DataError" in log
    verbose = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, "FMNIST_VERBOSE": "1"})
    assert verbose.stderr.splitlines()[0] == "error: m.pt: not a checkpoint"
    assert "KeyError: 'deep'" in verbose.stderr and verbose.returncode == 1


def test_the_error_log_is_in_the_users_state_folder_when_xdg_state_home_is_not_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_STATE_HOME", "FMNIST_VERBOSE")}
    env["HOME"] = str(tmp_path)
    code = ("from fmnist import stage\nfrom fmnist.errors import DataError\n"
            "def main():\n    raise DataError('bad')\n"
            "stage.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert (proc.returncode, proc.stderr) == (1, "error: bad\n")
    assert "error: bad" in (tmp_path / ".local" / "state" / "fmnist" / "last-error.log").read_text()  # the README's path
