"""A sweep's runs, trained one after another in this process or side by side in worker processes.

Each worker trains its run as a sequential sweep would, on ``cores // W`` threads, and returns its rows;
this process keeps grid order, saves finished runs for resuming and stops everything at the first
failure (see docs/scale-out.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import io
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections import namedtuple
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from tqdm import tqdm

from . import resume, runtime, threadshare
from .data import load_processed
from .engine import final_metrics, to_device, train_run
from .errors import PipelineError
from .params import TrainParams
from .tracking import RunManager, run_name


def worker_count(setting: int, n_runs: int, cores: int) -> int:
    """Workers for a sweep of ``n_runs``: ``setting`` (0 = one per core), never more than there are runs."""
    return max(1, min(setting or cores, n_runs))


def threads_per_run(cores: int, workers: int) -> int:
    return max(1, cores // workers)


def run_sweep(
    runs: Sequence, configs: Sequence[TrainParams], data_dir: str | os.PathLike, staging: Path,
    state: resume.SavedState, device, workers: int, threads: int, progress: bool = False,
) -> RunManager:
    """Train every run not finished in ``state`` (``threads`` each if ``workers`` > 1); rows in grid order."""
    saved = state.load() or {"finished": {}, "current": None}
    if workers == 1:
        return _sequential(runs, configs, data_dir, staging, state, saved, device, progress)
    return _parallel(runs, configs, data_dir, staging, state, saved, workers, threads)


def finals(runs: Sequence, manager: RunManager) -> list[dict]:
    """Per run, in grid order: its number, name, final metrics and grid values (sweep_best.json's candidates)."""
    return [
        {"run": i, "name": run_name(run), **final_metrics([r for r in manager.run_data if r["run"] == i]),
         "params": run._asdict()}
        for i, run in enumerate(runs, 1)
    ]


def _announce(i: int, n: int, name: str, note: str = "") -> None:
    sys.stderr.write(f"sweep run {i}/{n}: {name}{note}\n")  # one write: workers share the stream
    sys.stderr.flush()


def _resume_for(current: dict | None, i: int) -> dict | None:
    """The per-epoch state of run ``i`` if a sequential sweep was cut short during it."""
    return current["state"] if current is not None and current["run"] == i else None


def _sequential(runs, configs, data_dir, staging: Path, state, saved, device, progress: bool) -> RunManager:
    data = load_processed(data_dir)
    train, val = (to_device(s, data.mean, data.std, device) for s in (data.train, data.val))
    finished, current = saved["finished"], saved["current"]
    manager = RunManager(log_root=staging)
    with threadshare.ThreadShare() as threads:
        for i, (run, p) in enumerate(zip(runs, configs), 1):
            name = run_name(run)
            if i in finished:  # done before an interruption: its rows and logs are put back as they were
                _announce(i, len(runs), name, ": finished earlier")
                manager.add_finished_run(run, finished[i]["rows"])
                resume.restore(staging / name, finished[i]["logs"])
                continue
            _announce(i, len(runs), name)
            train_run(p, train, val, manager, run=run, progress=progress, threads=threads,
                      resume=_resume_for(current, i),
                      on_epoch=lambda s: state.save(finished=finished, current={"run": i, "state": s}))
            finished[i] = {"rows": manager.run_rows(), "logs": resume.snapshot(staging / name)}
            current = None
            state.save(finished=finished, current=None)
    return manager


def _parallel(runs, configs, data_dir, staging: Path, state, saved, workers: int, threads: int) -> RunManager:
    finished, current = saved["finished"], saved["current"]
    n = len(runs)
    for i, run in enumerate(runs, 1):
        if i in finished:
            _announce(i, n, run_name(run), ": finished earlier")
            resume.restore(staging / run_name(run), finished[i]["logs"])
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))
    try:
        futures = {
            pool.submit(train_in_worker, i, n, run._asdict(), p, os.fspath(data_dir), os.fspath(staging), threads,
                        _resume_for(current, i)): i
            for i, (run, p) in enumerate(zip(runs, configs), 1) if i not in finished
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=futures.get):
                i = futures[future]
                finished[i] = {"rows": _result(future, i, n, runs[i - 1]),
                               "logs": resume.snapshot(staging / run_name(runs[i - 1]))}
            if current is not None and current["run"] in finished:
                current = None
            state.save(finished=finished, current=current)
    except BaseException:  # a failed run, or this process stopped: no worker may outlive the staging folder
        # ProcessPoolExecutor only waits for its workers; this stage starts no other multiprocessing children
        children = multiprocessing.active_children()
        for child in children:
            child.terminate()
        for child in children:
            child.join()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    manager = RunManager(log_root=None)
    for i, run in enumerate(runs, 1):
        manager.add_finished_run(run, finished[i]["rows"])
    return manager


def _result(future, i: int, n: int, run) -> list[dict]:
    """A worker's rows, or its error as one line naming the run."""
    try:
        return future.result()
    except PipelineError as e:
        raise PipelineError(f"sweep run {i}/{n} ({run_name(run)}): {e}") from e
    except BrokenProcessPool:  # every run in progress fails with it: this one is not necessarily the cause
        raise PipelineError(f"a sweep worker process died (killed, or out of memory?) while run {i}/{n} "
                            f"({run_name(run)}) was in progress") from None


def _init_worker(parent: int) -> None:
    """A worker's process-wide setup: die with the sweep, leave Ctrl-C to it, log as a stage does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep's process hears it and terminates the workers
    with contextlib.suppress(OSError, AttributeError, TypeError):  # Linux only: SIGKILL when the parent dies
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the sweep ended before this worker was ready
        os._exit(1)
    # whole lines, each in one write, so that the workers' live tables interleave by line
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding=sys.stderr.encoding,
                                  errors="backslashreplace", line_buffering=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # tqdm's default multiprocessing lock leaks a semaphore when a worker is terminated
    tqdm.set_lock(threading.RLock())


@functools.lru_cache(maxsize=1)
def _splits(data_dir: str, device: str):
    """The train and validation splits on ``device``, loaded once per worker."""
    data = load_processed(data_dir)
    return tuple(to_device(s, data.mean, data.std, torch.device(device)) for s in (data.train, data.val))


def train_in_worker(
    i: int, n: int, values: dict, p: TrainParams, data_dir: str, staging: str, threads: int, resume_state: dict | None,
) -> list[dict]:
    """Train grid run ``i`` of ``n`` (its grid ``values``) in this worker; its rows, numbered ``i``."""
    run = namedtuple("Run", values)(**values)  # the grid's own tuple type is made on the fly: it does not pickle
    _announce(i, n, run_name(run))
    device = runtime.configure(p)  # the same settings as the sweep's process, whose environment this inherited
    torch.set_num_threads(threads)
    train, val = _splits(data_dir, str(device))
    manager = RunManager(log_root=staging, stream=sys.stderr)  # the worker's own stream, not the default
    manager.run_count = i - 1  # rows are numbered in grid order, as in a sequential sweep
    # a thread-independent run follows the cores free, as in a sequential sweep; any other keeps its share
    share = threadshare.ThreadShare() if runtime.thread_independent(p, device.type) else contextlib.nullcontext()
    with share as follow:
        train_run(p, train, val, manager, run=run, threads=follow, resume=resume_state)
    return manager.run_rows()
