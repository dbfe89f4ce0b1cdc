"""Sharing a machine's cores between the trainings on it, across processes (:class:`ThreadShare`)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

from .runtime import available_cores, thread_independent

log = logging.getLogger(__name__)


def busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the machine has spent busy on ``cpus`` since boot (from /proc/stat), or None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


class ThreadShare:
    """This process's share of the cores, as a context manager around a training; :meth:`rebalance` per epoch.

    OpenMP threads that outnumber the free cores spin against each other (docs/performance.md), so a
    run whose bits allow it takes the smaller of ``cores // trainings`` (each training locks a file in
    this user's private folder; a dead owner's lock vanishes with it) and the cores other processes
    left free in the last epoch (/proc/stat's busy time minus this process's). Any other run uses all.
    """

    SAMPLE = 0.25  # seconds of /proc/stat the first measurement waits for: shorter is below its clock ticks

    def __init__(self, cores: int | None = None, folder: str | os.PathLike | None = None):
        self.cores = cores or available_cores()
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        self.folder = Path(folder or Path(base) / f"fmnist-trainings-{os.getuid()}")
        self._file = self._path = None
        self._cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self._last: tuple[float, float, float] | None = None  # (wall, machine busy, own CPU) seconds

    def __enter__(self) -> ThreadShare:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.folder.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o077:  # another user's, or theirs to write in
                raise PermissionError(f"not a private folder of this user (owner {st.st_uid}, "
                                      f"mode {st.st_mode & 0o777:o})")
            staged = self.folder / f".{os.getpid()}.{os.urandom(4).hex()}"
            f = open(staged, "w")
            fcntl.flock(f, fcntl.LOCK_EX)
            self._path = staged.with_name(staged.name[1:] + ".lock")
            os.replace(staged, self._path)  # visible to others only once locked
            self._file = f
        except OSError as e:  # no shared folder: this training counts itself alone
            log.warning("cannot register this training in %s (%s): it will not share cores", self.folder, e)
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._path.unlink(missing_ok=True)
            self._file.close()
            self._file = None

    def count(self) -> int:
        """Trainings registered on this machine now, this one included (at least 1)."""
        live = 0
        try:
            entries = list(self.folder.glob("*.lock"))
        except OSError:
            return 1
        for path in entries:
            try:
                with open(path) as f:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1
            except OSError:
                continue
            else:  # nobody holds it: its training died without cleaning up
                with contextlib.suppress(OSError):
                    path.unlink()
        return max(live, 1)

    def others_load(self) -> float:
        """Cores' worth of work other processes did on this process's cores since the last call (the first
        call measures :attr:`SAMPLE` seconds: a training that starts beside busy work leaves it its cores)."""
        if self._last is None:
            self._last = (time.monotonic(), busy_seconds(self._cpus), time.process_time())
            time.sleep(self.SAMPLE)
        busy = busy_seconds(self._cpus)
        now = (time.monotonic(), busy, time.process_time())
        last, self._last = self._last, now
        if busy is None or last[1] is None or now[0] - last[0] < 0.2:  # too short to tell from clock ticks
            return 0.0
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))

    def threads_for(self, follow: bool) -> int:
        if not follow:
            return self.cores
        free = self.cores - int(self.others_load() + 0.5)  # a core mostly busy elsewhere is not free
        return max(1, min(self.cores // self.count(), free))

    def rebalance(self, p, device_type: str) -> int:
        """Set torch's thread count for run ``p``: its share if its bits allow, else every core."""
        import torch

        threads = self.threads_for(thread_independent(p, device_type))
        if threads != torch.get_num_threads():
            log.info("%d thread(s) for this process (%d cores; %d training(s) running)", threads, self.cores,
                     self.count())
            torch.set_num_threads(threads)
        return threads
