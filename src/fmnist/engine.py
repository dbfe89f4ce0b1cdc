"""The training engine of the train and sweep stages: the data on the device, one loop for the CPU and CUDA."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import time
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Split
from .distributed import World
from .errors import PipelineError
from .params import TrainParams, training_values
from .resume import restore_run_state, run_state
from .runtime import autocast

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split resident on the device: normalised images float [N, 1, 28, 28] and labels int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def to_device(split: Split, mean: float, std: float, device: torch.device) -> DeviceSplit:
    """Move a uint8 split to ``device`` once, then normalise it there in one pass."""
    x = split.images.to(device).unsqueeze(1).float().div_(255).sub_(mean).div_(std)
    return DeviceSplit(x.contiguous(memory_format=torch.channels_last), split.labels.to(device))


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of a chain of foreach ops per step, same arithmetic
    if p.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0,
                           weight_decay=p.weight_decay, fused=True)


def one_cycle(step: int, total_steps: int, warmup: float = 0.25, start_div: float = 25.0,
              end_div: float = 1e4) -> float:
    """The one-cycle factor at ``step``: linear warm-up from 1/start_div to 1, then cosine down to 1/end_div.

    Unlike torch's OneCycleLR, defined for any ``total_steps`` >= 1."""
    warm = max(1, int(warmup * total_steps))
    if step < warm:
        return 1 / start_div + (1 - 1 / start_div) * step / warm
    t = min(1.0, (step - warm) / max(1, total_steps - warm))
    return 1 / end_div + (1 - 1 / end_div) * 0.5 * (1 + math.cos(math.pi * t))


def training_state(model: nn.Module, p: TrainParams, n_train: int, device: torch.device):
    """(optimizer, :func:`one_cycle` scheduler or None, seeded batch-order generator) for ``n_train`` images."""
    optimizer = make_optimizer(model, p)
    scheduler = None
    if p.schedule != "constant":
        total = p.epochs * -(-n_train // p.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: one_cycle(step, total))
    return optimizer, scheduler, torch.Generator(device=device).manual_seed(p.seed)


class Diverged(PipelineError):
    """The training loss became NaN or infinite: nothing the run made is worth keeping."""


def train_one_epoch(
    model: nn.Module, data: DeviceSplit, optimizer: torch.optim.Optimizer, scheduler, p: TrainParams,
    generator: torch.Generator, tracker=None, progress: bool = False, epoch: int = 1, world: World = World(),
) -> None:
    """One pass over ``data`` in a seeded order; ``tracker`` (a RunManager) gets each batch's loss and predictions.

    Raises :class:`Diverged` if a loss was NaN or infinite. Under data parallelism every process draws
    the same permutation and flips and takes its shard of each global batch."""
    model.train()
    n = len(data)
    device = data.x.device
    order = torch.randperm(n, generator=generator, device=device)
    losses = []  # 0-d device tensors: checked once at the end, so CUDA is not synchronised per batch
    for start in tqdm(range(0, n, p.batch_size), leave=False, unit="batch", disable=not progress):
        idx = order[start : start + p.batch_size]
        batch = len(idx)  # the global batch: the last one may be short
        flip = torch.rand(batch, generator=generator, device=device) < 0.5 if p.flip else None  # mirror half
        if world.size > 1:
            part = world.shard(batch)
            idx, flip = idx[part], None if flip is None else flip[part]
        # index_select: a gather that is much faster than x[idx] for small batches on the CPU
        images, labels = data.x.index_select(0, idx), data.y.index_select(0, idx)
        if flip is not None:
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        with autocast(device, p.precision):
            logits = model(images)
            if world.size == 1:
                loss = F.cross_entropy(logits, labels, label_smoothing=p.label_smoothing)
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=p.label_smoothing, reduction="sum")
                loss = loss * (world.size / batch)  # DDP divides the summed gradients by world.size
        losses.append(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if tracker is not None:
            if world.size == 1:
                tracker.track_loss(loss, len(idx))
            else:  # this process's sum of per-image losses, as a mean over its shard
                tracker.track_loss(loss.detach() * (batch / world.size) / max(len(idx), 1), len(idx))
            tracker.track_num_correct(logits, labels)
    finite = torch.isfinite(torch.stack(losses))
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise Diverged(
            f"training diverged: the loss became {losses[bad].item()} at epoch {epoch}, batch {bad + 1} of "
            f"{len(losses)} (lr {p.lr}): lower lr in params.yaml"
        )


@torch.inference_mode()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1000, tta: bool = False, precision: str = "auto",
) -> torch.Tensor:
    """Logits [N, 10] float32 for images ``x`` [N, 1, 28, 28] (the seed's get_all_preds); ``tta`` adds mirrors."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        with autocast(x.device, precision):
            logits = model(batch).float()
            if tta:
                logits = (logits + model(batch.flip(-1)).float()) / 2
        out.append(logits)
    return torch.cat(out)


def evaluate(
    model: nn.Module, data: DeviceSplit, tta: bool = False, world: World = World(), precision: str = "auto",
) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, exact accuracy correct / total, logits) over a whole split.

    Under data parallelism each process predicts its shard (the logits returned); the sums are added up."""
    if world.size > 1:
        part = world.shard(len(data))
        logits, y = predict(model, data.x[part], tta=tta, precision=precision), data.y[part]
        loss_sum, correct = world.sum(F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum())
        return float(loss_sum) / len(data), int(correct) / len(data), logits
    logits = predict(model, data.x, tta=tta, precision=precision)
    loss = F.cross_entropy(logits, data.y).item()
    accuracy = int((logits.argmax(1) == data.y).sum()) / len(data)
    return loss, accuracy, logits


def fit(
    model: nn.Module, train: DeviceSplit, val: DeviceSplit, p: TrainParams, manager, progress: bool = False,
    threads=None, resume: dict | None = None, on_epoch=None, world: World = World(),
) -> list[dict]:
    """Train ``model`` for ``p.epochs`` epochs, validating after each; returns ``manager``'s rows for the run.

    ``threads``: a ThreadShare to rebalance before each epoch; ``resume``: a :func:`run_state` to go on
    from; ``on_epoch``: called with the :func:`run_state` after each epoch."""
    net = model.module if world.size > 1 else model  # DDP's wrapped module: what is saved and evaluated
    optimizer, scheduler, generator = training_state(net, p, len(train), train.x.device)
    done = 0 if resume is None else restore_run_state(resume, net, optimizer, scheduler, generator)
    for epoch in range(done + 1, p.epochs + 1):
        if threads is not None:
            threads.rebalance(p, train.x.device.type)
        manager.begin_epoch()
        train_one_epoch(model, train, optimizer, scheduler, p, generator, manager, progress, epoch=epoch,
                        world=world)
        if world.size > 1:  # every process's sums, added up: the epoch's figures are the global batch's
            loss_sum, correct, samples = world.sum(manager.epoch_loss, manager.epoch_num_correct,
                                                   manager.epoch_samples)
            manager.epoch_loss, manager.epoch_num_correct, manager.epoch_samples = loss_sum, int(correct), int(samples)
            # every process validates the model rank 0 saves: with its BatchNorm statistics, which on
            # the CPU are its shard's (the next training step broadcasts them anyway)
            for buffer in net.buffers():
                torch.distributed.broadcast(buffer, src=0)
        val_loss, val_acc, _ = evaluate(net, val, world=world, precision=p.precision)
        manager.end_epoch(val_loss, val_acc)
        if on_epoch is not None:
            on_epoch(run_state(net, optimizer, scheduler, generator, manager, epoch))
    return manager.run_rows()


def final_metrics(rows: list[dict]) -> dict:
    """A run's metrics: train and validation loss and accuracy of its last epoch."""
    last = rows[-1]
    return {"train_loss": last["loss"], "train_accuracy": last["accuracy"],
            "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"]}


def train_run(
    p: TrainParams, train: DeviceSplit, val: DeviceSplit, manager, run=None, name: str | None = None,
    progress: bool = False, log_dir=None, threads=None, resume: dict | None = None, on_epoch=None,
    world: World = World(),
) -> tuple[nn.Module, dict]:
    """Build ``p.model`` from ``p.seed``, train it with :func:`fit` (in DistributedDataParallel where
    ``world`` has several processes) and close the run in ``manager``: the trained model, :func:`final_metrics`."""
    from .models import build_model, cpu_kernel_on  # local: models import nothing from here; a flat graph

    model = build_model(p.model, p.width, p.seed, cpu_kernel=cpu_kernel_on(train.x.device, p.cpu_kernel))
    model = model.to(train.x.device, memory_format=torch.channels_last)
    if run is None:
        fields = dataclasses.asdict(p)
        run = namedtuple("Run", fields)(**fields)
    trained = model
    if world.size > 1:
        if train.x.device.type == "cuda":  # on the CPU BatchNorm stays per process (docs/scale-out.md)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[train.x.device.index] if train.x.device.type == "cuda" else None)
    # torch.optim loads torch._dynamo at its first use, a slow import: here, before the run's clocks start
    importlib.import_module("torch._dynamo")
    try:
        manager.begin_run(run, model, name=name, example=train.x[:64], log_dir=log_dir, resume=resume)
        start = time.perf_counter()
        rows = fit(trained, train, val, p, manager, progress=progress, threads=threads, resume=resume,
                   on_epoch=on_epoch, world=world)
    except BaseException:  # an error or a signal: the log's writer thread must stop before its folder goes
        manager.abort_run()
        raise
    metrics = final_metrics(rows)
    manager.end_run(hparams=training_values(p), metrics=metrics)
    seconds = time.perf_counter() - start
    epochs = p.epochs - (0 if resume is None else resume["epoch"])
    log.info("%s: %d epochs in %.1f s (%.0f images/s), val accuracy %.2f%%", manager.run_name, epochs, seconds,
             epochs * len(train) / max(seconds, 1e-9), 100 * metrics["val_accuracy"])
    return model, metrics
