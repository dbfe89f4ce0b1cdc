"""fastnet variants that were measured and not adopted: one seed each, test accuracy and training time.

    python bench/fastnet_variants.py                       # the fastnet93 recipe as it is
    python bench/fastnet_variants.py --shift 1             # + random translations of up to 1 pixel
    python bench/fastnet_variants.py --cutout 9            # + one 9x9 square blanked per image
    python bench/fastnet_variants.py --ema 0.999           # + a moving average of the weights, tested
    python bench/fastnet_variants.py --tta-shift 1         # + TTA over four 1-pixel shifts
    python bench/fastnet_variants.py --stem unshuffle      # first block: pixel-unshuffle + conv, no pooling
    python bench/fastnet_variants.py --width 32 --epochs 27 --shift 1   # the fastnet94 recipe + translations

The recipe is fastnet93's (bench/fastnet93.yaml: bfloat16, native numerics, flips, label
smoothing 0.1, weight decay 5e-4, one-cycle), trained with the pipeline's model, optimiser,
schedule and data on data/processed, in a loop of its own that adds the variant. The time is the
training loop alone (no validation pass after each epoch, unlike the speedrun's). Prints one JSON
line. README, "A model worth using: fastnet", holds what these measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fmnist import models, params, runtime
from fmnist.data import load_processed
from fmnist.engine import autocast, make_optimizer, make_scheduler, predict, steps_per_epoch, to_device

ROOT = Path(__file__).resolve().parents[1]


def unshuffle_fastnet(w: int) -> nn.Sequential:
    """fastnet with its first block (conv at 28x28, then max-pooling) as pixel-unshuffle and a 14x14 conv."""
    stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                         nn.ReLU(inplace=True))
    return nn.Sequential(stem, models._block(w, 2 * w), models._block(2 * w, 2 * w, pool=True),
                         models._block(2 * w, 4 * w, pool=True), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(4 * w, 10, bias=False))


class Augment:
    """The recipe's random flips, then the variant's translations and cutout, per image, from one generator."""

    def __init__(self, shift: int, cutout: int, background: float, generator: torch.Generator):
        self.shift, self.cutout, self.background, self.g = shift, cutout, background, generator
        self.pixels = torch.arange(28)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, g, px = len(x), self.g, self.pixels
        x = torch.where((torch.rand(n, generator=g) < 0.5)[:, None, None, None], x.flip(-1), x)
        if self.shift:
            s = self.shift
            padded = F.pad(x, (s, s, s, s), value=self.background)
            dy, dx = (torch.randint(0, 2 * s + 1, (n,), generator=g) for _ in range(2))
            rows, cols = (dy[:, None] + px)[:, :, None], (dx[:, None] + px)[:, None, :]
            x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cutout:
            cy, cx = (torch.randint(0, 28, (n,), generator=g) for _ in range(2))
            half = self.cutout // 2
            square = (((px - cy[:, None]).abs() <= half)[:, :, None] & ((px - cx[:, None]).abs() <= half)[:, None, :])
            x = torch.where(square[:, None], torch.full((), self.background), x)
        return x


def accuracy(model: nn.Module, test, p: params.TrainParams, tta_shift: int = 0) -> float:
    """Test accuracy as the evaluate stage measures it (with ``p.tta``), optionally over shifted copies too."""
    precision = p.precision
    logits = predict(model, test.x, tta=p.tta, precision=precision)
    for dy, dx in ((tta_shift, 0), (-tta_shift, 0), (0, tta_shift), (0, -tta_shift)) if tta_shift else ():
        shifted = torch.roll(test.x, (dy, dx), (2, 3)).contiguous(memory_format=torch.channels_last)
        logits = logits + predict(model, shifted, tta=p.tta, precision=precision)
    return int((logits.argmax(1) == test.y).sum()) / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=int, default=0, help="random translations of up to this many pixels")
    parser.add_argument("--cutout", type=int, default=0, help="side of the square blanked in each image")
    parser.add_argument("--ema", type=float, default=0.0, help="decay of a moving average of the weights")
    parser.add_argument("--tta-shift", type=int, default=0, help="also average over 4 shifts of this many pixels")
    parser.add_argument("--stem", choices=["fastnet", "unshuffle"], default="fastnet")
    parser.add_argument("--data", default=str(ROOT / "data" / "processed"))
    args = parser.parse_args()

    recipe = yaml.safe_load((ROOT / "bench" / "fastnet93.yaml").read_text())
    recipe.update(width=args.width, epochs=args.epochs, seed=args.seed)
    p = params.train_params({}, **recipe)
    device = runtime.configure(p)
    data = load_processed(args.data)
    train, test = (to_device(s, data.mean, data.std, device) for s in (data.train, data.test))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        model = models.FastNet(p.width) if args.stem == "fastnet" else unshuffle_fastnet(p.width)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, p)
    scheduler = make_scheduler(optimizer, p, steps_per_epoch(len(train), p.batch_size))
    ema = None
    if args.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True)
    generator = torch.Generator().manual_seed(p.seed)
    augment = Augment(args.shift, args.cutout, float(-data.mean / data.std), generator)

    importlib.import_module("torch._dynamo")  # torch.optim loads it at its first use: not in the clock
    start = time.perf_counter()
    for _ in range(p.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for first in range(0, len(train), p.batch_size):
            idx = order[first : first + p.batch_size]
            images, labels = augment(train.x.index_select(0, idx)), train.y.index_select(0, idx)
            with autocast(device, p.precision):
                loss = F.cross_entropy(model(images), labels, label_smoothing=p.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
    seconds = time.perf_counter() - start
    tested = ema.module if ema is not None else model
    print(json.dumps({"variant": vars(args), "seconds": round(seconds, 1),
                      "test_accuracy": accuracy(tested, test, p, args.tta_shift)}))


if __name__ == "__main__":
    main()
