"""The seed Network's convolution -> max-pool -> ReLU layers as one C kernel on the CPU (``convpool.c``).

The C file is compiled on first use with the system compiler (``cc -O3 -march=native -fopenmp``)
into a cache folder keyed by the source, the flags and the CPU, then loaded with ``ctypes``.
Without a compiler, or with ``FMNIST_KERNELS=torch`` in the environment, :func:`conv_pool_relu`
uses PyTorch's own layers: same mathematics, slower. Which one runs is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import PipelineError
from .fileio import atomic_path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("convpool.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LAYERS = {(1, 5, 28): "conv1", (5, 12, 12): "conv2"}  # (in channels, out channels, size) -> C prefix
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_functions: dict[str, tuple] = {}  # C prefix -> (forward, backward), looked up once
_disabled = 0


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist"


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"convpool-{key}.so"
    if not target.exists():
        with atomic_path(target) as staged:  # a concurrent build or a crash never leaves half a library
            run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(staged), "-lm"], capture_output=True,
                                 text=True, errors="replace", timeout=300)
            if run.returncode != 0:
                raise OSError(f"{cc} failed: {run.stderr.strip()[-500:]}")
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in LAYERS.values():
        forward, backward = getattr(lib, f"{name}_forward"), getattr(lib, f"{name}_backward")
        forward.argtypes = [p, p, p, p, p, i64]
        backward.argtypes = [p, p, p, p, p, p, p, i64]
        backward.restype = ctypes.c_int
        _functions[name] = forward, backward
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built or are switched off."""
    global _lib
    if _lib is None:
        choice = os.environ.get("FMNIST_KERNELS", "c")
        if choice not in ("c", "torch"):
            raise PipelineError(f"FMNIST_KERNELS must be 'c' (the default) or 'torch', got {choice!r}")
        if choice == "torch":
            _lib = False
            log.info("FMNIST_KERNELS=torch: the Network's conv layers run on PyTorch's kernels")
        else:
            try:
                _lib = _build()
                log.info("the Network's conv layers run on the fused C kernel (%s)", _lib._name)
            except Exception as err:  # whatever went wrong, PyTorch's layers still work
                _lib = False
                log.warning("fused C kernel unavailable (%s); the Network's conv layers run on PyTorch's "
                            "kernels (slower)", err)
    return _lib or None


@contextlib.contextmanager
def disabled():
    """PyTorch's layers inside this block (FLOP counting, graph tracing)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def _usable(x: torch.Tensor, conv: torch.nn.Conv2d) -> str | None:
    """The C prefix for this layer, when the fused kernel computes exactly what ``conv`` would."""
    w = conv.weight
    if _disabled or torch.jit.is_tracing() or x.dim() != 4 or conv.bias is None:
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (x, w, conv.bias)):
        return None
    layout = (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    plain = layout == ((1, 1), (0, 0), (1, 1), 1, "zeros")
    name = LAYERS.get((w.shape[1], w.shape[0], x.shape[-1]))
    if not plain or name is None or x.shape[1] != w.shape[1] or x.shape[-2] != x.shape[-1] or w.shape[-2:] != (5, 5):
        return None
    return name if library() is not None else None


class _ConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, name):
        x = x.contiguous()  # NCHW; for one channel channels-last is the same memory
        weight, bias = weight.contiguous(), bias.contiguous()
        n, co, size = x.shape[0], weight.shape[0], (x.shape[-1] - 4) // 2
        out = torch.empty(n, co, size, size, dtype=torch.float32)
        idx = torch.empty(n, co, size, size, dtype=torch.uint8)
        _functions[name][0](x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), idx.data_ptr(), n)
        ctx.save_for_backward(x, weight, idx)
        ctx.name = name
        return out

    @staticmethod
    @once_differentiable  # the kernel's gradients are not themselves differentiable: say so, not a wrong answer
    def backward(ctx, gout):
        x, weight, idx = ctx.saved_tensors
        gout = gout.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None  # the kernel writes all of it
        gw, gb = torch.empty_like(weight), torch.empty(weight.shape[0], dtype=torch.float32)
        status = _functions[ctx.name][1](
            x.data_ptr(), weight.data_ptr(), gout.data_ptr(), idx.data_ptr(), None if gx is None else gx.data_ptr(),
            gw.data_ptr(), gb.data_ptr(), x.shape[0],
        )
        if status != 0:
            raise MemoryError("fused conv-pool kernel: out of memory for the per-thread gradient sums")
        return gx, gw, gb, None


def conv_pool_relu(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))``: fused on the CPU for the seed Network's shapes, else PyTorch's layers."""
    name = _usable(x, conv)
    if name is None:
        return F.relu(F.max_pool2d(conv(x), kernel_size=2, stride=2))
    return _ConvPoolReLU.apply(x, conv.weight, conv.bias, name)
