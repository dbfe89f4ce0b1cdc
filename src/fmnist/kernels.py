"""The seed Network's convolution -> max-pool -> ReLU layers as one C++ operator on the CPU.

``fmnist::conv_pool_relu(x, weight, bias) -> (out, idx)`` and its backward live in ``csrc/convpool.cpp``,
compiled into ``fmnist._C`` when the package is installed. This module registers their shapes and
gradient, and refuses a binary built from another source or torch. With ``fused=True``, float32 CPU
tensors of the seed Network's two layer shapes run the operator (a :class:`~fmnist.errors.PipelineError`
when it is not built, never a silent fallback); anything else runs PyTorch's layers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import PipelineError, first_line

SOURCE = Path(__file__).parent / "csrc" / "convpool.cpp"
LAYERS = {(1, 5, 28), (5, 12, 12)}  # (in channels, out channels, image size) the operator is built for
PLAIN = ((1, 1), (0, 0), (1, 1), 1, "zeros")  # stride, padding, dilation, groups, padding mode it computes
REBUILD = "run make, or pip install --no-build-isolation -e ."


@dataclass(frozen=True)
class _Library:
    """The outcome of loading fmnist._C: usable or not, a one-line status, and when not, what to do."""

    ok: bool
    status: str
    error: str = ""


def _refused(status: str, problem: str) -> _Library:
    return _Library(False, status, f"the fused CPU kernel {problem}; or set cpu_kernel: torch in params.yaml")


_state: _Library | None = None  # loaded on first use, not on import
_disabled = 0


def source_sha256() -> str:
    """SHA-256 of csrc/convpool.cpp as it is now (setup.py compiles the same hash into the binary)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def _import_extension():
    return importlib.import_module(f"{__package__}._C")  # ModuleNotFoundError naming it when not built


def _load() -> _Library:
    """Import fmnist._C and check it against this machine, this torch and the source beside it."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and not getattr(torch.cpu, "_is_avx2_supported", lambda: True)():  # setup.py builds it for AVX2
        return _refused("unusable: this CPU lacks AVX2", "is built for AVX2, which this CPU lacks")
    try:
        ext = _import_extension()
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}._C":
            raise
        return _refused("not built (fmnist._C is missing)",
                        "is not built (needs a C++ compiler: install g++ and run make, or pip install "
                        "--no-build-isolation -e .)")
    except ImportError as err:  # e.g. an undefined symbol: built against another torch
        why = first_line(err)
        return _refused(f"does not load ({why})", f"does not load ({why}): {REBUILD}")
    if not SOURCE.is_file():
        return _refused(f"unverifiable: {SOURCE} is missing",
                        f"cannot be checked against its source ({SOURCE} is missing): reinstall fmnist")
    built, current = ext.SOURCE_SHA256, source_sha256()
    if built != current:
        return _refused(f"stale (built from source sha256 {built[:12]}, the source is now {current[:12]})",
                        f"is stale (built from another version of {SOURCE.name}): {REBUILD}")
    running = torch.__version__.split("+")[0]
    if ext.TORCH_VERSION != running:
        return _refused(f"stale (built for torch {ext.TORCH_VERSION}, running {running})",
                        f"was built for torch {ext.TORCH_VERSION}, not {running}: {REBUILD}")
    return _Library(True, f"fused ({ext.__name__}, {ext.ISA}, source sha256 {current[:12]}...)")


def _library() -> _Library:
    global _state
    if _state is None:
        _state = _load()
        if _state.ok:
            _register()
    return _state


def available() -> bool:
    """Whether the fused operator is built, current and usable on this machine."""
    return _library().ok


def status() -> str:
    """One line for a run's environment record: what runs the Network's conv layers on the CPU, or why not."""
    return _library().status


def require() -> None:
    """Raise a one-line :class:`PipelineError` saying what to do when the fused operator cannot run."""
    lib = _library()
    if not lib.ok:
        raise PipelineError(lib.error)


@functools.cache  # once per process, however often _state is reloaded
def _register() -> None:
    """Shapes and gradient of the C++ operators, for autograd and torch.compile."""
    torch.library.register_fake("fmnist::conv_pool_relu")(_fake_forward)
    torch.library.register_fake("fmnist::conv_pool_relu_backward")(_fake_backward)
    torch.library.register_autograd("fmnist::conv_pool_relu", _backward, setup_context=_setup_context)
    torch.library.register_autograd("fmnist::conv_pool_relu_backward", _refuse_double_backward)


def _fake_forward(x, weight, bias):
    size = (x.shape[-1] - 4) // 2
    out = x.new_empty(x.shape[0], weight.shape[0], size, size)
    return out, out.new_empty(out.shape, dtype=torch.uint8)


def _fake_backward(x, weight, grad_out, idx, input_grad):
    gx = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    return gx, weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])  # output[1]: each output's window index


def _backward(ctx, grad_out, _grad_idx):
    x, weight, idx = ctx.saved_tensors
    gx, gw, gb = torch.ops.fmnist.conv_pool_relu_backward(x, weight, grad_out, idx, ctx.needs_input_grad[0])
    if gw.stride() != weight.stride():  # the weight's own layout (channels-last), as DDP's gradient buckets expect
        gw = torch.empty_strided(weight.shape, weight.stride(), dtype=gw.dtype, device=gw.device).copy_(gw)
    return gx if ctx.needs_input_grad[0] else None, gw, gb


def _refuse_double_backward(ctx, *grads):
    # say so rather than let autograd's fallback return a zero gradient with a warning
    raise RuntimeError("fmnist::conv_pool_relu_backward is not differentiable: the fused kernel has no "
                       "second derivatives (no double backward); use cpu_kernel: torch for them")


@contextlib.contextmanager
def disabled():
    """PyTorch's layers inside this block (FLOP counting, graph tracing)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def _usable(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether the fused operator computes exactly what ``conv`` followed by pooling and ReLU would."""
    w, b = conv.weight, conv.bias
    if _disabled or torch.jit.is_tracing() or x.dim() != 4 or b is None:
        return False
    if not (x.is_cpu and w.is_cpu and b.is_cpu and x.dtype == w.dtype == b.dtype == torch.float32):
        return False
    if (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) != PLAIN:
        return False
    _, c_in, height, width = x.shape  # ints: comparing torch.Size slices goes through a slower path
    c_out, w_in, kh, kw = w.shape
    return (c_in, c_out, width) in LAYERS and w_in == c_in and height == width and kh == kw == 5


def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    require()
    return torch.ops.fmnist.conv_pool_relu(x, weight, bias)[0]


def conv_pool_relu(x: torch.Tensor, conv: torch.nn.Conv2d, fused: bool = True) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))`` [N, C_out, (H-4)/2, (W-4)/2]; the fused operator when ``fused``
    and the layer is one it was built for, else PyTorch's layers."""
    if fused and _usable(x, conv):
        return _fused(x, conv.weight, conv.bias)
    return F.relu(F.max_pool2d(conv(x), kernel_size=2, stride=2))


if __name__ == "__main__":  # python -m fmnist.kernels: the status; exit status 1 when the operator is unusable
    print(f"fused CPU kernel: {status()}")
    raise SystemExit(0 if available() else 1)
