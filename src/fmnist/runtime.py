"""What decides a run's bits besides params.yaml (instruction set, thread count, versions): pinned,
checked and recorded (docs/reproducibility.md)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .errors import ParamsError, PipelineError

# The settings each library reads once, at its first operation.
NUMERICS_ENV = {
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
    "native": {},
}
PINNED_VARS = sorted({k for env in NUMERICS_ENV.values() for k in env})


def pin_numerics(mode: str) -> None:
    """Set the libraries' instruction-set switches for ``mode`` (removing the others, so that the shell's
    cannot change results unseen); call before the first tensor operation, which fixes the kernels."""
    if mode not in NUMERICS_ENV:
        raise PipelineError(f"numerics must be one of {', '.join(NUMERICS_ENV)}, got {mode!r}")
    for var in PINNED_VARS:
        os.environ.pop(var, None)
    os.environ.update(NUMERICS_ENV[mode])
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


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of ``keys``; None if there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(keys)), None)


def cpu_model() -> str:
    return _cpuinfo("model name", "Model", "Hardware") or platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The vector instruction sets this CPU offers that decide which kernels run (x86 and ARM names)."""
    flags = set((_cpuinfo("flags", "Features") or "").split())
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
    """Whether run ``p``'s bits are the same for any thread count: on the CPU only the seed Network on the
    fused kernel with MKL in strict portable mode (oneDNN splits sums by thread); on CUDA always."""
    if device_type != "cpu":
        return True
    return p.model == "network" and p.cpu_kernel == "fused" and p.numerics == "portable" and p.precision != "bfloat16"


# Packages besides torch whose code writes an output's bytes: their versions are in every run's record.
OUTPUT_PACKAGES = ("numpy", "tensorboard", "protobuf", "pillow", "dvc")


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # dvc on a machine that runs a stage script by hand, say
        return None


def environment(p, device, cores: int) -> dict:
    """What decides a run's bits: versions, device, numerics, precision, kernel path (threads where they count).

    It goes into hashed outputs, so it holds nothing else: machines that compute the same bits agree."""
    import torch

    from . import kernels
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


def resolve_device(name: str, setting: str = "params.yaml: device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error naming ``setting``."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"{setting} is 'cuda' but no CUDA GPU is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_deterministic() -> None:
    """Process-wide settings for bit-identical reruns; entry points call this once, first thing."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # torch.use_deterministic_algorithms imports torch._inductor.config, which loads the compiler stack
    # no stage runs (docs/performance.md): so its switch is set directly, and the compiler's flag if loaded.
    # Not warn_only: an operation with no deterministic implementation is an error where bits are promised.
    torch._C._set_deterministic_algorithms(True, warn_only=False)
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].deterministic = True
    # No NaN fill of new tensors (the deterministic mode's guard against reading unwritten memory):
    # none of our kernels do, and the fills cost every training step.
    torch.utils.deterministic.fill_uninitialized_memory = False


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype convolutions and matrix products run in: ``auto`` is bfloat16 on CUDA, float32 on the CPU."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def autocast(device: torch.device, precision: str = "auto"):
    """Autocast to :func:`compute_dtype` (a no-op for float32): weights, BatchNorm and the loss stay float32."""
    import torch

    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def configure(p) -> torch.device:
    """Everything a stage sets before its first tensor, for :class:`~fmnist.params.TrainParams` ``p``: its device."""
    pin_numerics(p.numerics)
    make_deterministic()
    device = resolve_device(p.device)
    check_precision(p, device)
    return device


def check_precision(p, device) -> None:
    """bfloat16 on the CPU needs oneDNN's AVX-512 kernels, which portable numerics forbids: a one-line error."""
    if p.precision == "bfloat16" and device.type == "cpu" and p.numerics == "portable":
        raise ParamsError("params.yaml: precision bfloat16 on the CPU needs numerics: native (pinned to AVX2, "
                          "PyTorch has no bfloat16 kernels and runs about 20x slower)")
