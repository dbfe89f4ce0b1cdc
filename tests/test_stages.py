"""The train and evaluate entry points on small data: every output, and nothing else, is left behind."""

import json
import subprocess
import sys

import pandas as pd
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist import CLASSES

from .conftest import ROOT


def run(stage, *args):
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_train_then_evaluate_write_every_output(tmp_path, processed_small):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"epochs": 2, "batch_size": 100, "tta": True}))
    out = tmp_path / "out"
    proc = run("train", "--data", processed_small, "--params", tmp_path / "params.yaml", "--model", out / "m.pt",
               "--metrics", out / "train.json", "--history", out / "h.csv", "--logdir", out / "runs" / "train")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads((out / "train.json").read_text())) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert pd.read_csv(out / "h.csv")["epoch"].tolist() == [1, 2]
    assert [p.name for p in (out / "runs").iterdir()] == ["train"]  # no staging folder left
    acc = EventAccumulator(str(out / "runs" / "train")).Reload()
    assert len(acc.Scalars("Loss/val")) == 2

    proc = run("evaluate", "--data", processed_small, "--params", tmp_path / "params.yaml", "--model", out / "m.pt",
               "--metrics", out / "eval.json", "--confusion", out / "confusion.csv", "--plots", out / "plots")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "eval.json").read_text())
    assert list(metrics["per_class_accuracy"]) == list(CLASSES)
    assert len(pd.read_csv(out / "confusion.csv")) == 200
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["confusion.png", "misclassified.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.csv", "eval.json", "h.csv", "m.pt", "plots", "runs", "train.json"]


def test_evaluate_without_a_checkpoint_is_one_line(tmp_path, processed_small):
    proc = run("evaluate", "--data", processed_small, "--model", tmp_path / "none.pt", "--params", ROOT / "params.yaml",
               "--metrics", tmp_path / "e.json", "--confusion", tmp_path / "c.csv", "--plots", tmp_path / "p")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'none.pt'}: checkpoint not found (run the train stage first)"


def test_train_and_evaluate_load_no_library_they_do_not_need(tmp_path, processed_small):
    """torchvision, matplotlib, pandas, torch.compile's stack: each cost a stage 0.2-1.5 s at its start.
    (torch.optim loads torch.compile's stack at its first use, so train does load that one.)"""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"epochs": 1, "batch_size": 100}))
    out = tmp_path / "out"
    common = ["--data", processed_small, "--params", tmp_path / "params.yaml", "--model", out / "m.pt"]
    for stage, args in (("train", ["--metrics", out / "t.json", "--history", out / "h.csv", "--logdir", out / "runs",
                                   "--env", out / "te.json", "--state", out / "s.pt"]),
                        ("evaluate", ["--metrics", out / "e.json", "--confusion", out / "c.csv", "--plots", out / "p",
                                      "--env", out / "ee.json"])):
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
