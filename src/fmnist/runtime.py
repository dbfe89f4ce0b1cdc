"""How a run computes, declared and recorded: the CPU instruction set, the thread count, the machine.

Three things outside params.yaml can change results silently: which instruction set PyTorch's
CPU kernels are dispatched to (AVX-512 on one machine, AVX2 on a teammate's), the thread count
(MKL's matrix products and the fused kernel's reductions split work by thread), and whether the
fused kernel is built. So:

- ``numerics: portable`` (the default) pins ATen, oneDNN and MKL to their AVX2 code paths, with
  MKL's conditional numerical reproducibility in strict mode, so that any x86-64 CPU with AVX2
  runs the same code; ``native`` lets each library pick the fastest path for this CPU.
  The libraries read these settings once, at their first operation, so :func:`pin_numerics`
  must run before any tensor is made (each stage calls it first thing).
- The thread count follows the cores actually free (:class:`ThreadShare`): a lone training uses
  every core, two use half each, and one beside other busy work uses what that work leaves.
  Only a run whose arithmetic does not depend on the thread count (the seed Network on the
  fused kernel with portable numerics) follows it; any other run always uses every core, so
  that its bits stay what this machine gives them.
- :func:`environment` records what of it decides the bits, with the versions, in every run's
  outputs; :func:`machine` records the rest (CPU, threads) beside the run's logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from .errors import ParamsError, PipelineError

log = logging.getLogger(__name__)

# The settings each library reads once, at its first operation.
NUMERICS_ENV = {
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
    "native": {},
}
PINNED_VARS = sorted({k for env in NUMERICS_ENV.values() for k in env})


def pin_numerics(mode: str) -> None:
    """Set the libraries' instruction-set switches for ``mode``; call before the first tensor operation.

    Variables the mode does not set are removed, so a value left in the shell cannot change
    results unseen. Raises :class:`PipelineError` when PyTorch is already running other kernels
    (too late in the process) or the CPU cannot run the portable ones.
    """
    if mode not in NUMERICS_ENV:
        raise PipelineError(f"numerics must be one of {', '.join(NUMERICS_ENV)}, got {mode!r}")
    for var in PINNED_VARS:
        if var in NUMERICS_ENV[mode]:
            os.environ[var] = NUMERICS_ENV[mode][var]
        else:
            os.environ.pop(var, None)
    if mode == "portable":
        import torch

        got = torch.backends.cpu.get_cpu_capability()
        if got != "AVX2":
            if platform.machine().lower() not in ("x86_64", "amd64"):
                raise PipelineError(f"numerics: portable pins x86-64 AVX2 kernels and this CPU is "
                                    f"{platform.machine()}: set numerics: native in params.yaml")
            if "AVX2" not in cpu_isa():
                raise PipelineError("numerics: portable needs a CPU with AVX2 and FMA, which this one lacks: "
                                    "set numerics: native in params.yaml")
            raise PipelineError(f"numerics: portable was set after PyTorch had chosen its {got} kernels in this "
                                "process: call fmnist.runtime.pin_numerics before the first tensor operation")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The vector instruction sets this CPU offers that decide which kernels run (x86 and ARM names)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    names = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX512F", "avx512_bf16": "AVX512_BF16",
             "avx512_vnni": "AVX512_VNNI", "amx_tile": "AMX", "asimd": "NEON", "sve": "SVE"}
    return [name for flag, name in names.items() if flag in flags]


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, a container), capped by OMP_NUM_THREADS if set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(limit))) if limit.isdigit() and int(limit) > 0 else cores


def thread_independent(p, device_type: str) -> bool:
    """Whether run ``p``'s bits are the same for any thread count (see the README, *Reproducibility*).

    On the CPU, the seed Network on the fused kernel with MKL in strict portable mode is; oneDNN's
    convolutions (fastnet, or the Network on PyTorch's layers) split their weight-gradient sums by
    thread, and MKL does too outside strict mode. On CUDA the CPU threads compute nothing.
    """
    if device_type != "cpu":
        return True
    return p.model == "network" and p.cpu_kernel == "fused" and p.numerics == "portable" and p.precision != "bfloat16"


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


def trainings_folder() -> Path:
    """Where this user's trainings register (:class:`ThreadShare`): a folder only this user can enter."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"fmnist-trainings-{os.getuid()}"


class ThreadShare:
    """This process's share of the machine's cores, given the trainings and other work running on it.

    OpenMP threads that outnumber the free cores spin against each other: two trainings of two
    threads each on two cores ran at 3% of one training's speed. So a run whose bits do not depend
    on the thread count takes, before each epoch, the smaller of

    - ``cores // trainings``: each fmnist training holds a lock on a file in this user's private
      folder (:func:`trainings_folder`) and counts the locked files (a dead owner's lock vanishes
      with it);
    - the cores other processes left free during the last epoch: the machine's busy time on this
      process's cores (/proc/stat) minus this process's own CPU time.

    Any other run always uses every core, so that its bits stay what this machine gives them.
    Use as a context manager around the training; :meth:`rebalance` before each epoch.
    """

    def __init__(self, cores: int | None = None, folder: str | os.PathLike | None = None):
        self.cores = cores or available_cores()
        self.folder = Path(folder or trainings_folder())
        self._file = None
        self._path: Path | None = None
        try:
            self._cpus = os.sched_getaffinity(0)
        except AttributeError:
            self._cpus = set()
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

    SAMPLE = 0.25  # seconds of /proc/stat the first measurement waits for: shorter is below its clock ticks

    def others_load(self) -> float:
        """Cores' worth of work other processes did on this process's cores since the last call.

        The first call, with nothing to compare with, waits :attr:`SAMPLE` seconds and measures
        those: a training that starts beside busy work does not take every core for its first epoch.
        """
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
        others = self.others_load()
        free = self.cores - int(others + 0.5)  # a core mostly busy elsewhere is not free
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


# Packages besides torch whose code writes an output's bytes: their versions are in every run's record.
OUTPUT_PACKAGES = ("numpy", "tensorboard", "protobuf", "pillow", "dvc")


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # dvc on a machine that runs a stage script by hand, say
        return None


def environment(p, device, cores: int) -> dict:
    """What decides a run's bits: versions, device, numerics, precision and kernel path.

    It goes into hashed outputs (the checkpoint, the git-tracked ``*_env.json``), so it holds
    nothing else: two machines that compute the same bits write the same record. The thread count
    is in it only where the bits depend on it; :func:`machine` has the rest.
    """
    import torch

    from . import kernels
    from .engine import compute_dtype
    from .models import cpu_kernel_on

    independent = thread_independent(p, device.type)
    env = {
        "python": ".".join(platform.python_version_tuple()[:2]),
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only loading refuses
        "packages": {name: package_version(name) for name in OUTPUT_PACKAGES},
        "platform": f"{platform.system()} {platform.machine()}",
        "device": str(device),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numerics": p.numerics,
        "numerics_env": {k: os.environ.get(k) for k in PINNED_VARS},
        "precision": p.precision,
        "compute_dtype": str(compute_dtype(device, p.precision)).removeprefix("torch."),
        "thread_independent": independent,
        "cpu_kernel": p.cpu_kernel,
        "kernel": kernels.status() if p.model == "network" and cpu_kernel_on(device, p.cpu_kernel) == "fused"
        else "PyTorch's layers",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if not independent:
        env["threads"] = cores
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def machine(device, cores: int) -> dict:
    """What this machine is, beyond :func:`environment`: kept beside a run's logs, out of every hash."""
    import torch

    info = {"python": platform.python_version(), "cpu": cpu_model(), "cpu_isa": cpu_isa(), "threads": cores}
    if device.type == "cuda":
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def configure(p) -> "torch.device":  # noqa: F821
    """Everything a stage sets before its first tensor: numerics, deterministic algorithms, device.

    ``p``: the run's :class:`~fmnist.params.TrainParams`. Returns the device it runs on.
    """
    pin_numerics(p.numerics)
    from .engine import make_deterministic, resolve_device

    make_deterministic()
    device = resolve_device(p.device)
    check_precision(p, device)
    return device


def check_precision(p, device) -> None:
    """bfloat16 on the CPU needs oneDNN's AVX-512 kernels, which portable numerics forbids: a one-line error."""
    if p.precision == "bfloat16" and device.type == "cpu" and p.numerics == "portable":
        raise ParamsError("params.yaml: precision bfloat16 on the CPU needs numerics: native (pinned to AVX2, "
                          "PyTorch has no bfloat16 kernels and runs about 20x slower)")
