"""The trained model as a standalone program: ``torch.export``'s ``.pt2``, which runs without this package.

The program takes what Fashion-MNIST's files hold, uint8 images [N, 28, 28] (a light item on black;
``fmnist.predict.prepare`` makes any picture so), and returns the ten classes' logits, float32 [N, 10].
The checkpoint's normalization is inside; PyTorch's own layers stand in for the fused CPU kernel, so
``torch.export.load`` needs nothing but torch. Exporting checks the program against the checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from .errors import DataError
from .fileio import atomic_path

TOLERANCE = 1e-5  # the most a logit of the program may differ from the checkpoint's own


class Standalone(nn.Module):
    """``model`` behind the pipeline's input conversion (``engine.to_device``): uint8 [N, 28, 28] -> logits."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.unsqueeze(1).float().div(255).sub(self.mean).div(self.std)
        return self.model(x.contiguous(memory_format=torch.channels_last))


def export(model: nn.Module, mean: float, std: float, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The program for ``model`` (PyTorch layers, eval mode, on the CPU), any batch size."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = example.clone()  # its own storage: the program keeps the example, and a view keeps all it views
    return torch.export.export(Standalone(model, mean, std).eval(), (example,), dynamic_shapes=({0: batch},))


def check(program: torch.export.ExportedProgram, reference: nn.Module, mean: float, std: float,
          images: torch.Tensor) -> float:
    """The largest difference between the program's logits and ``reference``'s (the checkpoint's model as the
    evaluate stage runs it) on ``images``; a DataError past :data:`TOLERANCE`."""
    with torch.no_grad():
        ours = program.module()(images)
        theirs = Standalone(reference, mean, std).eval()(images)
    worst = (ours - theirs).abs().max().item()
    if not worst <= TOLERANCE:
        raise DataError(f"the exported program's logits differ from the checkpoint's by {worst:.3g} "
                        f"(more than {TOLERANCE:g})")
    return worst


def save(program: torch.export.ExportedProgram, path: str | Path) -> None:
    """Write ``program`` to ``path``; its bytes depend on the program only: not on where the code lies (the
    stack traces torch records name its files) nor on the file written (the archive's inner folder is named
    after it, were it saved to a path)."""
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
