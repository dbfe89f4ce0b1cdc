"""``fmnist doctor``'s checks of this machine: Python, the packages, torch, the CPU, CUDA, the fused kernel.

Each check is one line: ``ok``, ``info`` (nothing to do), ``todo`` (missing, with the next step) or ``FAIL``
(the default pipeline cannot run; the only state that makes the exit status non-zero). The machine is
checked through the libraries fmnist runs, not ``torch.utils.collect_env`` (a subprocess per tool).
"""

from __future__ import annotations

import importlib.metadata  # binds importlib too
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

from . import runtime
from .errors import PipelineError, first_line

OK, INFO, TODO, FAIL = "ok", "info", "todo", "FAIL"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``state`` one of ok, info, todo, FAIL; ``next`` what to do, if anything."""

    name: str
    state: str
    detail: str
    next: str = ""


def guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """Run ``check``; an exception it did not expect becomes one FAIL line, not a traceback."""
    try:
        return check()
    except PipelineError as e:
        return [Check(name, FAIL, str(e))]
    except Exception as e:  # noqa: BLE001 (doctor reports what is broken, whatever it is)
        return [Check(name, FAIL, f"{type(e).__name__}: {first_line(e)}")]


def _pins() -> dict[str, str]:
    """The exact versions fmnist's metadata pins (``torch==2.14.1``): package -> version."""
    exact = r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)\s*"
    found = (re.fullmatch(exact, req) for req in importlib.metadata.requires("fmnist") or [])
    return {m[1].lower(): m[2] for m in found if m}


def check_package(module: str, dist: str, label: str, needed_for: str) -> Check:
    """A package that must import: its version, and whether it matches fmnist's pin."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (ImportError, or e.g. a torchvision built for another torch)
        return Check(label, FAIL, f"{label} does not import ({first_line(e)}); {needed_for} needs it",
                     "make (builds .venv from uv.lock), then source .venv/bin/activate")
    version = str(getattr(mod, "__version__", None) or runtime.package_version(dist))  # torch's has its +cu tag
    pin = _pins().get(dist)
    if pin and version.split("+")[0] != pin:
        return Check(label, TODO, f"{label} {version}, but fmnist pins {pin}: results will not match the committed "
                                  "ones bit for bit", "make (installs the versions locked in uv.lock)")
    return Check(label, OK, f"{label} {version}")


def check_torch() -> list[Check]:
    found = check_package("torch", "torch", "torch", "every stage")
    if found.state == FAIL:
        return [found]
    import torch

    x = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    got = (x @ x).sum().item()  # [[0,1],[2,3]]^2 = [[2,3],[6,11]]
    if got != 22.0:
        return [found, Check("torch", FAIL, f"a 2x2 matrix product on the CPU gave {got}, not 22",
                             "rebuild the environment: rm -rf .venv && make")]
    return [replace(found, detail=found.detail + "; a tensor operation runs") if found.state == OK else found]


def check_dvc() -> list[Check]:
    found = check_package("dvc", "dvc", "DVC", "every pipeline command")
    if found.state == OK and shutil.which("dvc") is None:
        return [found, Check("DVC", TODO, "the dvc command is not on PATH", "source .venv/bin/activate")]
    return [found]


def check_cpu() -> list[Check]:
    import torch

    isa = " ".join(runtime.cpu_isa()) or "none of AVX2, AVX-512, NEON"
    cores, threads = runtime.available_cores(), torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS")
    limit = f", OMP_NUM_THREADS={omp}" if omp else ""
    return [
        Check("CPU", OK, f"CPU {runtime.cpu_model()} ({platform.machine()}; {isa}; PyTorch's own choice of "
                         f"kernels: {torch.backends.cpu.get_cpu_capability()}, numerics: portable pins AVX2)"),
        Check("threads", OK, f"threads: torch uses {threads}; {cores} core(s) available to this process "
                             f"({os.cpu_count()} on the machine{limit}); a training takes every available core, "
                             "or its share when several run"),
    ]


def _cudnn_version(v: int) -> str:
    """cuDNN's version number as major.minor.patch: 92400 -> 9.24.0 (cuDNN 9), 8907 -> 8.9.7 (cuDNN 8)."""
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 90000 else f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def check_cuda() -> list[Check]:
    import torch

    built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "torch built without CUDA"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    libs = f"{built}, cuDNN {_cudnn_version(cudnn)}" if cudnn else built
    if not torch.cuda.is_available():
        return [Check("CUDA", INFO, f"CUDA: no GPU available ({libs}); device: auto trains on the CPU")]
    checks = [Check("CUDA", OK, f"CUDA: {torch.cuda.device_count()} GPU(s) ({libs})")]
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        checks.append(Check("GPU", OK, f"GPU {i}: {props.name}, compute capability {props.major}.{props.minor}, "
                                       f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"))
    x = torch.ones(2, 2, device="cuda")
    if (x @ x).sum().item() != 8.0:
        checks.append(Check("CUDA", FAIL, "a 2x2 matrix product on the GPU gave a wrong result",
                            "check the NVIDIA driver; meanwhile set device: cpu in params.yaml"))
    return checks


def check_kernel() -> list[Check]:
    from . import kernels

    state = OK if kernels.available() else INFO  # whether it is needed is the params.yaml check's call
    return [Check("fused CPU kernel", state, f"fused CPU kernel: {kernels.status()}")]


def environment_checks() -> list[Check]:
    checks = [Check("Python", OK, f"Python {platform.python_version()} ({sys.executable})")]
    checks += guarded("torch", check_torch)
    torch_ok = checks[-1].state != FAIL
    checks += guarded("torchvision", lambda: [check_package("torchvision", "torchvision", "torchvision",
                                                            "train (image grids in its TensorBoard log)")])
    checks += guarded("DVC", check_dvc)
    checks += guarded("TensorBoard", lambda: [check_package("tensorboard", "tensorboard", "TensorBoard",
                                                            "train (its logs)")])
    checks += guarded("Pillow", lambda: [check_package("PIL", "pillow", "Pillow", "fmnist predict")])
    if torch_ok:  # the rest asks torch
        for name, check in (("CPU", check_cpu), ("CUDA", check_cuda), ("fused CPU kernel", check_kernel)):
            checks += guarded(name, check)
    return checks


