"""Training speed: the seed's DataLoader loop against the project's training path, in one process.

    python bench/bench.py                 # throughput at batch sizes 100 and 1000, then time to accuracy
    python bench/bench.py --no-accuracy   # throughput only (about a minute)

Needs the pipeline's data/raw and data/processed (run `dvc repro transform` first). Prints
training images per second for each path (medians over alternating rounds) and their ratio (the
median of the rounds' ratios), FLOPs per training image, the achieved GFLOP/s, a matrix-multiply
GFLOP/s ceiling measured in the same run, and the time the default training (params.yaml) takes
to reach 90% test accuracy beside the seed loop's best accuracy over the same number of epochs.
``--json FILE`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from fmnist import kernels, params
from fmnist.data import load_processed
from fmnist.engine import evaluate, to_device, train_one_epoch, training_state
from fmnist.runtime import make_deterministic, resolve_device
from fmnist.models import build_model
from reference import seed_network, seed_train_epoch, seed_train_set
from fmnist.tracking import RunManager


def matmul_ceiling(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of a large float32 matrix multiply: the practical arithmetic limit of the device."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_image(model_name: str, device: torch.device, batch: int = 100) -> float:
    """Floating-point operations of one training step (forward and backward), per image."""
    model = build_model(model_name, cpu_kernel="torch").to(device)  # the counter sees PyTorch's ops only
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


class SeedLoop:
    """The tutorial's training: a DataLoader over torchvision's FashionMNIST, Adam, the seed's loop."""

    def __init__(self, train_set, batch_size: int):
        self.n = len(train_set)
        self.model = seed_network()
        self.loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        warm = DataLoader(Subset(train_set, range(20 * batch_size)), batch_size=batch_size)
        seed_train_epoch(self.model, warm, self.opt)

    def epoch(self) -> float:
        """Train one epoch; images per second."""
        start = time.perf_counter()
        seed_train_epoch(self.model, self.loader, self.opt)
        return self.n / (time.perf_counter() - start)


class ProjectLoop:
    """The project's training path (train_one_epoch with a RunManager) on the same model, Adam and batch size."""

    def __init__(self, train, batch_size: int, device: torch.device):
        self.train, self.device = train, device
        self.p = params.train_params({}, model="network", optimizer="adam", lr=0.01, weight_decay=0.0,
                                     batch_size=batch_size, schedule="constant")
        cpu_kernel = self.p.cpu_kernel if device.type == "cpu" else "torch"  # as engine.train_run chooses
        self.model = build_model("network", cpu_kernel=cpu_kernel).to(device, memory_format=torch.channels_last)
        self.opt, _, self.gen = training_state(self.model, self.p, len(train), device)  # constant: no scheduler
        self.manager = RunManager(stream=io.StringIO())
        self.manager.begin_run(None, self.model, name="bench")
        # a few steps first, so one-time set-up (oneDNN primitives, the C++ kernel, CUDA) is not timed
        n = 20 * batch_size
        train_one_epoch(self.model, type(train)(train.x[:n], train.y[:n]), self.opt, None, self.p, self.gen)

    def epoch(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.manager.begin_epoch()
        train_one_epoch(self.model, self.train, self.opt, None, self.p, self.gen, self.manager)
        sync(self.device)
        rate = len(self.train) / (time.perf_counter() - start)
        self.manager.end_epoch()
        return rate


def project_time_to_accuracy(p, train, test, device, target: float) -> dict:
    """Train with ``p``; after each epoch measure test accuracy (not timed). Training seconds to ``target``."""
    cpu_kernel = p.cpu_kernel if device.type == "cpu" else "torch"  # as engine.train_run chooses
    model = build_model(p.model, p.width, p.seed, cpu_kernel).to(device, memory_format=torch.channels_last)
    opt, sched, gen = training_state(model, p, len(train), device)
    manager = RunManager(stream=io.StringIO())
    manager.begin_run(None, model, name="bench")
    elapsed, reached, history = 0.0, None, []
    for epoch in range(1, p.epochs + 1):
        sync(device)
        start = time.perf_counter()
        manager.begin_epoch()
        train_one_epoch(model, train, opt, sched, p, gen, manager)
        sync(device)
        elapsed += time.perf_counter() - start
        manager.end_epoch()
        acc = evaluate(model, test, tta=p.tta)[1]
        history.append((epoch, elapsed, acc))
        if reached is None and acc >= target:
            reached = {"epoch": epoch, "seconds": elapsed, "accuracy": acc}
    return {"reached": reached, "final_accuracy": history[-1][2], "seconds": elapsed, "history": history}


def seed_best_accuracy(train_set, test, epochs: int, batch_size: int) -> dict:
    """The tutorial's settings (Adam, lr 0.01, no schedule) over ``epochs``: best test accuracy and time."""
    model = seed_network()
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    elapsed, best = 0.0, 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        seed_train_epoch(model, loader, opt)
        elapsed += time.perf_counter() - start
        best = max(best, evaluate(model, test)[1])
    return {"best_accuracy": best, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating seed/project epochs per batch size; medians are reported")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the time-to-accuracy runs")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    make_deterministic()
    device = resolve_device(args.device)
    data = load_processed(args.data)
    train = to_device(data.train, data.mean, data.std, device)
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   + (torch.cuda.get_device_name() if device.type == "cuda" else "CPU"),
        "torch": torch.__version__,
        "conv_kernels": kernels.status() if device.type == "cpu" else "PyTorch",
    }
    print(f"machine: {results['machine']}; torch {torch.__version__}; the Network's conv layers: "
          f"{results['conv_kernels']}", flush=True)

    ceiling = matmul_ceiling(device)
    flops = flops_per_image("network", device)
    results.update(matmul_gflops=ceiling, flops_per_image=flops, throughput=[])
    print(f"matmul ceiling: {ceiling:.0f} GFLOP/s; seed Network: {flops / 1e6:.2f} MFLOP per training image")

    on_cpu = device.type == "cpu"  # the seed's DataLoader loop is CPU-bound: it is timed on the CPU only
    with tempfile.TemporaryDirectory() as tmp:
        seed_set = seed_train_set(args.raw, tmp) if on_cpu else None
        print(f"\n{'batch':>6} {'seed loop img/s':>16} {'project img/s':>14} {'ratio':>6} {'GFLOP/s':>8} {'% of ceiling':>13}")
        for bs in args.batch_sizes:
            # Rounds alternate one seed epoch and one project epoch, so that a drift in the machine's
            # speed (which drifts within minutes on a shared machine) hits both; medians are reported.
            seed_loop = SeedLoop(seed_set, bs) if on_cpu else None
            project_loop = ProjectLoop(train, bs, device)
            seed_rates, rates = [], []
            for _ in range(args.rounds):
                if seed_loop:
                    seed_rates.append(seed_loop.epoch())
                rates.append(project_loop.epoch())
            seed = statistics.median(seed_rates) if seed_rates else None
            ours = statistics.median(rates)
            gflops = ours * flops / 1e9
            # the ratio of each round's pair (measured a few seconds apart), then their median
            ratios = [b / a for a, b in zip(seed_rates, rates)]
            ratio = statistics.median(ratios) if ratios else None
            results["throughput"].append({"batch_size": bs, "seed": seed, "project": ours, "ratio": ratio,
                                          "gflops": gflops, "seed_rounds": seed_rates, "project_rounds": rates,
                                          "round_ratios": ratios})
            spread = f"  (rounds: {', '.join(f'{r:.1f}x' for r in ratios)})" if ratios else ""
            print(f"{bs:>6} {seed or float('nan'):>16,.0f} {ours:>14,.0f} {ratio or float('nan'):>5.1f}x "
                  f"{gflops:>8.1f} {gflops / ceiling:>12.1%}{spread}", flush=True)

        if not args.no_accuracy:
            p = params.train_params(params.load(args.params))
            test = to_device(data.test, data.mean, data.std, device)
            ours = project_time_to_accuracy(p, train, test, device, args.target)
            results["time_to_accuracy"] = {"params": {k: getattr(p, k) for k in ("model", "optimizer", "lr",
                                           "batch_size", "epochs", "weight_decay")}, **ours}
            r = ours["reached"]
            print(f"\nproject, params.yaml ({p.model}, {p.optimizer} lr {p.lr}, batch {p.batch_size}, "
                  f"{p.epochs} epochs): final test accuracy {ours['final_accuracy']:.2%} after {ours['seconds']:.1f} s "
                  "of training; " + (f"{args.target:.0%} reached at epoch {r['epoch']}, {r['seconds']:.1f} s"
                                     if r else f"{args.target:.0%} not reached"), flush=True)
            if on_cpu:
                seed = seed_best_accuracy(seed_set, test_unnormalised(data, device), p.epochs, 100)
                results["seed_accuracy"] = seed
                print(f"seed loop (Adam lr 0.01, batch 100, {p.epochs} epochs): best test accuracy "
                      f"{seed['best_accuracy']:.2%}, {seed['seconds']:.1f} s of training")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def test_unnormalised(data, device):
    """The test split as the seed sees it: ToTensor's [0, 1] pixels, no normalisation."""
    return to_device(data.test, 0.0, 1.0, device)


if __name__ == "__main__":
    sys.exit(main())
