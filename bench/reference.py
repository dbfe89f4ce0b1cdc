"""The tutorial's way, kept as the baseline that benchmarks and equivalence tests measure against.

torchvision's ``FashionMNIST`` with ``ToTensor()``, a ``DataLoader``, the seed's ``Network`` on
PyTorch's layers and the seed's loop; the only change is that the model returns logits.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fmnist.models import Network, build_model


class SeedNetwork(Network):
    """The tutorial's ``Network`` as written (ReLU, then pool, on PyTorch's layers); only ``forward`` differs."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = F.max_pool2d(F.relu(self.conv1(t)), kernel_size=2, stride=2)
        t = F.max_pool2d(F.relu(self.conv2(t)), kernel_size=2, stride=2)
        t = F.relu(self.fc1(t.reshape(-1, 12 * 4 * 4)))
        t = F.relu(self.fc2(t))
        return self.out(t)


def seed_network(seed: int = 0) -> SeedNetwork:
    """The seed's Network with the initial weights ``build_model("network", seed=seed)`` gets."""
    model = SeedNetwork()
    model.load_state_dict(build_model("network", seed=seed).state_dict())
    return model


def seed_train_set(raw_dir: str | Path, root: str | Path):
    """The tutorial's Extract/Transform: torchvision ``FashionMNIST`` with ``ToTensor()``, over ``raw_dir``'s files.

    They are decompressed into ``root`` as ``FashionMNIST(root, download=False)`` expects.
    """
    import torchvision

    dest = Path(root) / "FashionMNIST" / "raw"
    dest.mkdir(parents=True, exist_ok=True)
    for gz in Path(raw_dir).glob("*.gz"):
        out = dest / gz.name.removesuffix(".gz")
        if not out.exists():
            with gzip.open(gz, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return torchvision.datasets.FashionMNIST(
        root, train=True, download=False, transform=torchvision.transforms.Compose([torchvision.transforms.ToTensor()])
    )


def seed_train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """One epoch of the seed's loop; returns (mean loss over samples, correct predictions)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        preds = model(images)
        loss = F.cross_entropy(preds, labels)
        total_loss += loss.item() * len(labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct += preds.argmax(dim=1).eq(labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct
