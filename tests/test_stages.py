"""The train and evaluate entry points on small data: every output, and nothing else, is left behind."""

import json
import subprocess
import sys

import pandas as pd
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist import CLASSES

from .conftest import ROOT, outputs


def run(stage, *args):
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_train_then_evaluate_write_every_output(tmp_path, processed_small):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"epochs": 2, "batch_size": 100, "tta": True}))
    out = tmp_path / "out"
    proc = run("train", "--data", processed_small, "--params", tmp_path / "params.yaml", *outputs("train", out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "runs"]  # the resume state is gone
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["train"]  # no staging folder left
    # what the README says TensorBoard shows of a training: the four curves, every parameter's and
    # gradient's histogram, a grid of training images, the model graph and the hyperparameters
    acc = EventAccumulator(str(out / "runs" / "train"), size_guidance={"histograms": 0}).Reload()
    tags = acc.Tags()
    assert {"Loss/train", "Loss/val", "Accuracy/train", "Accuracy/val"} <= set(tags["scalars"])
    assert all(len(acc.Scalars(tag)) == 2 for tag in ("Loss/train", "Loss/val"))
    names = [name for name, _ in torch.load(out / "model.pt", weights_only=True)["state_dict"].items()
             if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert {*names, *(f"{n}.grad" for n in names)} <= set(tags["histograms"])
    assert tags["images"] and tags["graph"]
    assert acc.PluginTagToContent("hparams")  # the HPARAMS tab (raises KeyError when there is none)

    proc = run("evaluate", "--data", processed_small, "--params", tmp_path / "params.yaml",
               "--model", out / "model.pt", *outputs("evaluate", out))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "eval.json").read_text())
    assert list(metrics["per_class_accuracy"]) == list(CLASSES)
    assert len(pd.read_csv(out / "confusion.csv")) == 200
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["confusion.png", "misclassified.png"]
    # what the checkpoint carries from training, written out for git: the final figures are the
    # history's last row, and the environment is the checkpoint's
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    train = json.loads((out / "train.json").read_text())
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert list(history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    last = history.iloc[-1]
    assert train == {"train_loss": last["loss"], "train_accuracy": last["accuracy"],
                     "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"]} == checkpoint["metrics"]
    assert json.loads((out / "train_env.json").read_text()) == checkpoint["environment"]
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.csv", "eval.json", "eval_env.json", "history.csv", "model.pt", "plots", "runs", "train.json",
        "train_env.json"]


def test_evaluate_without_a_checkpoint_is_one_line(tmp_path, processed_small):
    proc = run("evaluate", "--data", processed_small, "--model", tmp_path / "none.pt", "--params", ROOT / "params.yaml",
               *outputs("evaluate", tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'none.pt'}: checkpoint not found (run the train stage first)"


def test_train_and_evaluate_load_no_library_they_do_not_need(tmp_path, processed_small):
    """torchvision, matplotlib, pandas, torch.compile's stack: each cost a stage 0.2-1.5 s at its start.
    (torch.optim loads torch.compile's stack at its first use, so train does load that one.)"""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"epochs": 1, "batch_size": 100}))
    out = tmp_path / "out"
    common = ["--data", processed_small, "--params", tmp_path / "params.yaml"]
    for stage, args in (("train", outputs("train", out)),
                        ("evaluate", ["--model", out / "model.pt", *outputs("evaluate", out)])):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "stages" / f"{stage}.py"),
                               *map(str, common + args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "torch" in imported, stage
        heavy = ("torchvision", "matplotlib", "pandas")
        if stage == "evaluate":
            heavy += ("torch._dynamo", "torch._inductor")
        assert not {m for m in imported if m.startswith(heavy)}, stage
