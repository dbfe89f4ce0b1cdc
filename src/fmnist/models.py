"""Models, chosen by name from params.yaml (``model:``); each ``forward`` returns logits [B, 10].

The seed's ``forward`` ended in ``softmax`` before ``F.cross_entropy``, a second softmax that
saturates the loss; here the loss does the softmax once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import ParamsError
from .params import CPU_KERNELS


def _checked_cpu_kernel(cpu_kernel: str) -> str:
    if cpu_kernel not in CPU_KERNELS:
        raise ParamsError(f"params.yaml: cpu_kernel must be one of {', '.join(CPU_KERNELS)}, got {cpu_kernel!r}")
    return cpu_kernel


class Network(nn.Module):
    """The seed's CNN: two 5x5 convolutions with 2x2 max-pooling, three linear layers (32,672 parameters).

    ``cpu_kernel``: ``fused`` runs each conv, pool and ReLU on the CPU as one C++ operator
    (fmnist.kernels), ``torch`` as PyTorch's layers.
    """

    def __init__(self, cpu_kernel: str = "fused"):
        super().__init__()
        self.cpu_kernel = _checked_cpu_kernel(cpu_kernel)
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=5, kernel_size=5)
        self.conv2 = nn.Conv2d(in_channels=5, out_channels=12, kernel_size=5)
        # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so the flattened map is 12 x 4 x 4
        self.fc1 = nn.Linear(in_features=12 * 4 * 4, out_features=120)
        self.fc2 = nn.Linear(in_features=120, out_features=60)
        self.out = nn.Linear(in_features=60, out_features=10)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # pool, then ReLU: ReLU is monotonic, so the seed's ReLU-then-pool gives the same values and gradients
        fused = self.cpu_kernel == "fused"
        t = kernels.conv_pool_relu(t, self.conv1, fused=fused)
        t = kernels.conv_pool_relu(t, self.conv2, fused=fused)
        t = F.relu(self.fc1(t.flatten(1)))
        t = F.relu(self.fc2(t))
        return self.out(t)


def _block(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 convolution, then (if ``pool``) 2x2 max-pooling, then BatchNorm and ReLU.

    Pooling first leaves BatchNorm and ReLU (memory-bound on a CPU) a quarter of the values.
    """
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FastNet(nn.Module):
    """A BatchNorm CNN: blocks of ``width``, 2x, 2x, 4x channels (28 -> 14 -> 7 -> 3), global max-pool, linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(1, w, pool=True),
            _block(w, 2 * w), _block(2 * w, 2 * w, pool=True),
            _block(2 * w, 4 * w, pool=True),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, 10, bias=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(t))


MODELS = {
    "network": lambda width, cpu_kernel: Network(cpu_kernel),
    "fastnet": lambda width, cpu_kernel: FastNet(width),  # PyTorch's layers: cpu_kernel does not apply
}


def cpu_kernel_on(device: torch.device | str, cpu_kernel: str) -> str:
    """The conv layers' path on ``device``: ``cpu_kernel`` on the CPU; elsewhere PyTorch's layers always run."""
    return cpu_kernel if torch.device(device).type == "cpu" else "torch"


def build_model(name: str, width: int = 16, seed: int = 0, cpu_kernel: str = "fused") -> nn.Module:
    """Build model ``name`` with weights drawn from ``seed``, leaving the global RNG as it was."""
    if name not in MODELS:
        raise ParamsError(f"params.yaml: model must be one of {', '.join(MODELS)}, got {name!r}")
    if _checked_cpu_kernel(cpu_kernel) == "fused" and name == "network":
        kernels.require()  # a one-line error here, before any training, if the operator is not built
    with torch.random.fork_rng(devices=[]):  # saves and restores the CPU generator only...
        torch.random.default_generator.manual_seed(seed)  # ...so seed only that one (init runs on the CPU)
        return MODELS[name](width, cpu_kernel)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
