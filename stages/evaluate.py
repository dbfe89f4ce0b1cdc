"""DVC stage `evaluate`: predict the test set with the trained checkpoint; write metrics and plots.

It also writes what the checkpoint carries from training (final metrics, per-epoch history, what
decided the bits), so that every figure a commit reports is in git, readable without DVC's cache.
"""

import argparse
from pathlib import Path

import torch.nn.functional as F

from fmnist import params, runtime, stage, threadshare
from fmnist.checkpoint import HISTORY, load_checkpoint
from fmnist.data import load_processed
from fmnist.engine import predict, to_device
from fmnist.evaluation import (
    confusion_matrix, per_class_accuracy, save_confusion_png, save_misclassified_png, write_confusion_csv,
)
from fmnist.fileio import write_csv, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--confusion", required=True, help="DVC confusion plot data")
    parser.add_argument("--plots", required=True, help="folder for confusion.png and misclassified.png")
    parser.add_argument("--env", required=True, help="what the predictions computed on")
    parser.add_argument("--train-metrics", required=True, help="the training's final metrics")
    parser.add_argument("--history", required=True, help="the training's per-epoch DVC plot data")
    parser.add_argument("--train-env", required=True, help="what the training computed on")
    args = parser.parse_args()  # outputs have no default: dvc.yaml names every path

    p = params.train_params(params.load(args.params))
    device = runtime.configure(p)  # numerics pinned before the first tensor exists
    model, info = load_checkpoint(args.model, device, cpu_kernel=p.cpu_kernel)
    data = load_processed(args.data)
    norm = info["normalize"]
    test = to_device(data.test, norm["mean"], norm["std"], device)

    with threadshare.ThreadShare() as threads:
        threads.rebalance(p, device.type)
        logits = predict(model, test.x, tta=p.tta, precision=p.precision)
    preds = logits.argmax(1)
    cm = confusion_matrix(preds, test.y)
    accuracy = cm.diagonal().sum().item() / cm.sum().item()  # exact: a fraction of two counts
    write_json(args.metrics, {
        "test_loss": F.cross_entropy(logits, test.y).item(),
        "test_accuracy": accuracy,
        "per_class_accuracy": per_class_accuracy(cm),
    })
    write_confusion_csv(args.confusion, preds, test.y)
    save_confusion_png(Path(args.plots) / "confusion.png", cm, f"{info['model']}: test accuracy {accuracy:.2%}")
    save_misclassified_png(Path(args.plots) / "misclassified.png", data.test.images, test.y, preds)
    write_json(args.env, runtime.environment(p, device, threads.cores))
    write_json(args.train_metrics, info["metrics"])
    write_csv(args.history, info["history"], HISTORY)
    write_json(args.train_env, info["environment"])


if __name__ == "__main__":
    stage.run(main)
