"""Checkpoints: the state dict plus what it takes to rebuild the model and feed it, loaded safely."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import DataError, ParamsError, first_line
from .fileio import atomic_path
from .models import build_model, cpu_kernel_on
from .params import TrainParams, train_params, training_values

FORMAT = 2  # 2: with the training's metrics and history
HISTORY = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")  # the per-epoch columns a checkpoint keeps


def save_checkpoint(
    path: str | Path, model: nn.Module, p: TrainParams, mean: float, std: float, environment: dict | None = None,
    metrics: dict | None = None, history: list[dict] | None = None,
) -> None:
    """Write the weights with what rebuilds and feeds them, the ``environment`` they were trained in, the final
    ``metrics`` and the per-epoch ``history``: the training's one output besides its logs, for DVC's run-cache."""
    payload = {
        "format": FORMAT, "model": p.model, "width": p.width, "params": training_values(p),
        "normalize": {"mean": mean, "std": std}, "environment": environment or {}, "metrics": metrics or {},
        "history": [{k: row[k] for k in HISTORY} for row in history or []],
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)  # a file object, not a path: the archive's folder name is then fixed


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """The checkpoint's contents, weights on ``device``; ``weights_only=True`` runs no pickled code. No kernel
    runs, so a caller can still pin the numerics it records (:func:`trained_params`) before the first one."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found (run the train stage first)") from None
    except Exception as e:  # a truncated or foreign file: say which, not where in the unpickler
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from e  # FMNIST_VERBOSE shows e
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), int):
        raise DataError(f"{path}: not a checkpoint written by this project (format {FORMAT})")
    if payload["format"] != FORMAT:
        raise DataError(f"{path}: checkpoint format {payload['format']}, this version reads {FORMAT}: "
                        "retrain it with `dvc repro`")
    return payload


def trained_params(info: dict) -> TrainParams:
    """The training parameters a checkpoint (or its metadata) records; keys it predates take their defaults."""
    try:
        return train_params(info.get("params", {}))
    except ParamsError as e:
        raise DataError(f"checkpoint: its recorded parameters are not valid here ({e})") from None


def model_from(payload: dict, path: str | Path, device: torch.device | str = "cpu",
               cpu_kernel: str = "fused") -> tuple[nn.Module, dict]:
    """(model on ``device`` in eval mode, metadata) from :func:`read_checkpoint`'s ``payload`` of ``path``."""
    try:
        model = build_model(payload["model"], payload["width"], cpu_kernel=cpu_kernel_on(device, cpu_kernel))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as e:
        reason = f"{type(e).__name__}: {first_line(e)}"
        raise DataError(f"{path}: checkpoint does not match its model ({reason})") from None
    model.to(device).eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", cpu_kernel: str = "fused"
                    ) -> tuple[nn.Module, dict]:
    """(model on ``device`` in eval mode, metadata): :func:`read_checkpoint`, then :func:`model_from`."""
    return model_from(read_checkpoint(path, device), path, device, cpu_kernel)
