"""The speedrun's figures are the pipeline's: a record's seed trains and tests as the train and evaluate stages do."""

import json
import subprocess
import sys

import pytest
import yaml

from .conftest import ROOT, outputs

SPEEDRUN = ROOT / "bench" / "speedrun.py"


def stage(name: str, *args) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_records_seed_gives_the_train_and_evaluate_stages_accuracies(tmp_path, processed_small):
    proc = subprocess.run([sys.executable, str(SPEEDRUN), "--worker", "network90", "1", "--device", "cpu",
                           "--data", str(processed_small)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    preset = yaml.safe_load((ROOT / "bench" / "network90.yaml").read_text())
    assert run["record"] == "network90" and run["preset"] == preset and run["seed"] == 1 and run["device"] == "cpu"
    assert run["seconds"] > 0

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**preset, "seed": 1, "device": "cpu"}))
    common = ["--data", processed_small, "--params", tmp_path / "params.yaml"]
    stage("train", *common, *outputs("train", tmp_path))
    stage("evaluate", *common, "--model", tmp_path / "model.pt", *outputs("evaluate", tmp_path))
    assert run["val_accuracy"] == json.loads((tmp_path / "train.json").read_text())["val_accuracy"]
    assert run["test_accuracy"] == json.loads((tmp_path / "eval.json").read_text())["test_accuracy"]


def test_the_table_says_whether_the_mean_reaches_the_target_and_how_to_reproduce_it():
    sys.path.insert(0, str(SPEEDRUN.parent))
    try:
        import speedrun
    finally:
        sys.path.remove(str(SPEEDRUN.parent))
    env = {"cpu": "Some CPU", "threads": 2, "gpu": None, "torch": "2"}
    preset = yaml.safe_load((ROOT / "bench" / "fastnet93.yaml").read_text())

    def runs(values, *accs):
        return [{"test_accuracy": a, "seconds": 10.0 + a, "environment": env, "preset": values} for a in accs]

    lines = speedrun.table({"network90": runs({"model": "network"}, 0.899, 0.903),
                            "fastnet93": runs(preset, 0.931, 0.927)}).splitlines()
    assert "| network90 | 90.0% | 90.10% (89.90%-90.30%) |" in lines[2] and "| yes |" in lines[2]
    assert "| fastnet93 | 93.0% | 92.90% (92.70%-93.10%) |" in lines[3] and "| no |" in lines[3]
    assert "Some CPU, 2 cores" in lines[2]
    assert lines[3].endswith(f"| `{speedrun.command(preset)}` |")
    assert all(f"-S {k}=" in lines[3] for k in preset)

    with pytest.raises(SystemExit, match="different presets"):
        speedrun.table({"fastnet93": runs(preset, 0.93) + runs({**preset, "epochs": 1}, 0.93)})
