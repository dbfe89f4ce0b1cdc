"""Shared fixtures: the offline Fashion-MNIST mirror, tiny IDX files made on the spot, processed data."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import transform
from fmnist.extract import FILES, Source, extract
from fmnist.params import DataParams
from fmnist.runtime import available_cores

ROOT = Path(__file__).resolve().parents[1]
# every core this run may use (affinity, and the caller's OMP_NUM_THREADS if set), as a user's run has
# them: read before pytest_configure sets a worker's share; WHOLE_MACHINE gives them to a command
ALL_CORES = available_cores()
WHOLE_MACHINE = {"OMP_NUM_THREADS": str(ALL_CORES)}
MIRROR = Path(os.environ.get("FMNIST_MIRROR", ROOT.parent / "shared" / "datasets" / "fashion-mnist"))


def pytest_configure(config):
    """This process computes as every stage does by default: portable numerics, pinned before any tensor.

    So what a test runs in-process (``fmnist predict``'s ``main``, say) can pin the numerics a
    default checkpoint records, as a fresh process would. Under pytest-xdist each worker, and every
    process it starts, computes on its share of the cores (:func:`worker_share`); :data:`WHOLE_MACHINE`
    gives a command all of them.
    """
    import torch

    from fmnist import runtime

    share = worker_share(os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", ""))
    if share is not None:
        os.environ["OMP_NUM_THREADS"] = str(share)  # the processes this worker starts read it
        torch.set_num_threads(share)  # torch in this process read it at import, before this hook
    runtime.pin_numerics("portable")
    # the stages' error logs (fmnist.stage.error_log) go to a folder of this run, not the user's own
    config.stash[STATE] = os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="fmnist-tests-state-")
    if config.rootpath == ROOT:  # this repository's suite, not a pytest that a test starts elsewhere
        config.stash[CHECKOUT] = checkout_state()


def worker_share(worker: str, count: str) -> int | None:
    """Cores for pytest-xdist worker ``worker`` (``gw0``...) of ``count``: the cores this run may use, split
    evenly, the first workers taking the remainder (None outside xdist). OpenMP threads beyond the free
    cores spin against each other, so workers that each took every core would slow one another down."""
    if not worker.startswith("gw") or not count.isdigit() or int(count) < 2:
        return None
    cores, n, index = available_cores(), int(count), int(worker[2:])
    return max(1, cores // n + (index < cores % n))


@pytest.fixture(autouse=True)
def _torch_threads():
    """torch's thread count as each test found it: a training run in this process (ThreadShare) sets its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    """The tests of an xdist_group first: the groups are the longest units of work pytest-xdist hands out,
    in collection order, so started last they would leave the other cores idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable: the rest keep their order


# Paths that tests may create or change in the checkout: the venv, pytest's cache and DVC's scratch
# folder (any dvc command writes there, a read-only one like `dvc dag` included); Python's bytecode too.
CACHES = (".venv/", ".pytest_cache/", ".dvc/tmp/")
CHECKOUT = pytest.StashKey[list]()
STATE = pytest.StashKey[str]()


def checkout_state() -> list[str]:
    """Every changed, untracked and ignored path of the working tree (``git status``), caches aside, with
    each file's modification time: the same list after the tests means they created, changed and
    deleted nothing."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    paths = [entry[3:] for entry in status.split("\0") if entry[3:]]
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    state = []
    for path in sorted(set(paths) | set(filter(None, tracked.split("\0")))):
        if path.startswith(CACHES) or "__pycache__/" in path:
            continue
        try:
            state.append(f"{path} {(ROOT / path).stat().st_mtime_ns}")
        except FileNotFoundError:
            state.append(f"{path} (missing)")
    return state


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if the tests left the checkout other than they found it (every output belongs in tmp_path)."""
    before = session.config.stash.get(CHECKOUT, None)
    if before is None:
        return
    after = checkout_state()
    if before != after:
        changed = sorted(set(before) ^ set(after))
        names = sorted({line.rsplit(" ", 1)[0] for line in changed})
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the tests created, changed or deleted files of the checkout: {', '.join(names[:20])}"
        if reporter is not None:
            reporter.write_line(f"FAILED {message}", red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    """Remove this process's error-log folder (each xdist worker has its own)."""
    if STATE in config.stash:
        shutil.rmtree(config.stash[STATE], ignore_errors=True)


def idx_images(images: np.ndarray, magic: int = 0x803, count: int | None = None) -> bytes:
    n, rows, cols = images.shape
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, n if count is None else count, rows, cols))
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 0x801) -> bytes:
    return magic.to_bytes(4, "big") + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()


def write_raw(folder: Path, n_train: int = 120, n_test: int = 30, seed: int = 0, **replace: bytes) -> Path:
    """Write four small gzipped IDX files under the official names; ``replace`` swaps a file's bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "train-images-idx3-ubyte.gz": idx_images(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte.gz": idx_labels(rng.integers(0, 10, n_train)),
        "t10k-images-idx3-ubyte.gz": idx_images(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": idx_labels(rng.integers(0, 10, n_test)),
    }
    for name, payload in content.items():
        raw = replace.get(name.replace("-", "_").replace(".", "_"))
        (folder / name).write_bytes(raw if raw is not None else gzip.compress(payload))
    return folder


@dataclass(frozen=True)
class Process:
    pid: int
    cwd: Path
    env: dict[str, str]


def running(needle: str) -> list[Process]:
    """The processes of this user whose command line contains ``needle`` (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or needle.encode() not in (proc / "cmdline").read_bytes():
                continue
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            env = dict(item.split("=", 1) for item in environ if "=" in item)
            found.append(Process(int(proc.name), Path(os.readlink(proc / "cwd")), env))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_ci() -> bool:
    """True where the CI system says so (CI=true, as GitHub Actions, GitLab and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system's Chromium, for the browser tests; without it a test is skipped on a laptop, failed in CI."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing = "chromium is not installed (apt-get install chromium)"
        if in_ci():
            pytest.fail(f"{missing}; CI must run the browser tests", pytrace=False)
        pytest.skip(missing)
    return path


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline mirror's folder; without it a test is skipped on a laptop but fails in CI, which exists to run it."""
    if not all((MIRROR / f).is_file() for f in FILES):
        missing = f"the Fashion-MNIST mirror is not at {MIRROR} (set FMNIST_MIRROR)"
        if in_ci():
            pytest.fail(f"{missing}; CI must run the tests that use it", pytrace=False)
        pytest.skip(missing)
    return MIRROR


@pytest.fixture(scope="session")
def raw_full(mirror, tmp_path_factory) -> Path:
    """The four real files, extracted and verified from the mirror."""
    out = tmp_path_factory.mktemp("full") / "raw"
    extract(out, [Source(str(mirror))])
    return out


@pytest.fixture(scope="session")
def processed_full(raw_full) -> Path:
    out = raw_full.parent / "processed"
    transform(raw_full, out, DataParams())
    return out


@pytest.fixture(scope="session")
def processed_small(tmp_path_factory) -> Path:
    """Processed data from random tiny IDX files: 600 train images, 100 validation, 200 test."""
    base = tmp_path_factory.mktemp("small")
    write_raw(base / "raw", n_train=700, n_test=200)
    transform(base / "raw", base / "processed", DataParams(val_size=100))
    return base / "processed"


@dataclass(frozen=True)
class Pipeline:
    repo: Path                          # a git copy of this repository after `dvc repro` on small data, committed
    repro: subprocess.CompletedProcess  # that `dvc repro`


@pytest.fixture(scope="session")
def pipeline(mirror, tmp_path_factory) -> Pipeline:
    """The small-data pipeline reproduced once for every end-to-end module; each works on its own copy
    (``tests.e2e.repo_clone``) and never changes this one."""
    from .e2e import repo_copy, sh  # they import ROOT from here

    repo = repo_copy(tmp_path_factory.mktemp("pipeline") / "repo", mirror)
    proc = sh(repo, "dvc", "repro")  # on this worker's share of the cores
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    return Pipeline(repo, proc)


@dataclass(frozen=True)
class Experiment:
    repo: Path                          # a copy of `pipeline`'s repository after `dvc exp run -S lr=<lr>`
    run: subprocess.CompletedProcess    # that `dvc exp run`
    lr: float


@pytest.fixture(scope="session")
def experiment(pipeline, tmp_path_factory) -> Experiment:
    """One experiment with a new lr, run once for the tests that inspect its results (each reads this copy or
    works on a copy of its own)."""
    from .e2e import repo_clone, sh

    repo, lr = repo_clone(pipeline.repo, tmp_path_factory.mktemp("experiment") / "repo"), 0.02
    return Experiment(repo, sh(repo, "dvc", "exp", "run", "-S", f"lr={lr}", env=WHOLE_MACHINE), lr)


# Each stage's output arguments, as file names under a test's folder (the stages have no default
# output paths, so a stage run by a test cannot write into the checkout).
OUTPUTS = {
    "train": {"--model": "model.pt", "--logdir": "runs/train", "--state": "state/train.pt"},
    "evaluate": {"--metrics": "eval.json", "--confusion": "confusion.csv", "--plots": "plots",
                 "--env": "eval_env.json", "--train-metrics": "train.json", "--history": "history.csv",
                 "--train-env": "train_env.json"},
    "sweep": {"--results": "sweep.csv", "--best": "best.json", "--env": "sweep_env.json",
              "--logdir": "runs/sweep", "--state": "state/sweep.pt"},
}


def outputs(stage: str, out: Path, **names: str) -> list[str]:
    """``stage``'s output arguments, every path under ``out``; ``names`` renames some (``model="m.pt"``)."""
    files = {**OUTPUTS[stage], **{f"--{k.replace('_', '-')}": v for k, v in names.items()}}
    return [str(a) for flag, name in files.items() for a in (flag, out / name)]
