import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist import params
from fmnist.errors import ParamsError

from .conftest import ROOT


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"lr": []}, "params.yaml: sweep.lr is an empty list; give at least one value"),
        ({"lr": [0.01, -0.1]}, "params.yaml: sweep.lr must be a positive number, got -0.1"),
        ({"dropout": [0.1]}, "params.yaml: sweep.dropout is not a training key that can be swept"),
        ({"device": ["cpu"]}, "params.yaml: sweep.device is not a training key that can be swept"),
        ({"batch_size": [100, 0]}, "params.yaml: sweep.batch_size must be a positive integer, got 0"),
    ],
)
def test_bad_sweep_values_name_the_key(sweep, message):
    with pytest.raises(ParamsError) as e:
        params.sweep_grid({"sweep": sweep})
    assert str(e.value).startswith(message)


def test_a_single_value_is_a_one_value_list():
    assert params.sweep_grid({"sweep": {"lr": 0.1, "optimizer": ["adam", "sgd"]}}) == {
        "lr": [0.1], "optimizer": ["adam", "sgd"]}


def run_sweep(tmp_path, processed, sweep, **top_level):
    cfg = {**top_level, "sweep": sweep}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "sweep.py"), "--data", str(processed),
         "--params", str(tmp_path / "params.yaml"), "--results", str(tmp_path / "metrics" / "sweep.csv"),
         "--best", str(tmp_path / "metrics" / "sweep_best.json"), "--env", str(tmp_path / "metrics" / "env.json"),
         "--logdir", str(tmp_path / "runs"), "--state", str(tmp_path / "state.pt")],
        capture_output=True, text=True,
    )


def test_bad_sweep_fails_before_any_run_starts(tmp_path, processed_small):
    proc = run_sweep(tmp_path, processed_small, {"lr": [0.01, 0.02], "epochs": [1, -2]})
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: params.yaml: sweep.epochs must be a positive integer, got -2"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "metrics").exists()


def test_sweep_writes_rows_best_run_and_tensorboard_per_run(tmp_path, processed_small):
    proc = run_sweep(tmp_path, processed_small, {"lr": [0.01, 0.001], "epochs": [1, 2]})
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(tmp_path / "metrics" / "sweep.csv")
    assert len(df) == 1 + 2 + 1 + 2  # one row per run and epoch
    assert set(df.columns) == {"run", "name", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "epochs"}
    assert df.groupby("run")["epoch"].max().tolist() == [1, 2, 1, 2]
    # the seed's full table, timings included, lives with the logs DVC caches, not in git
    table = pd.read_csv(tmp_path / "runs" / "runs.csv")
    assert {"epoch_duration", "run_duration"} <= set(table.columns)
    assert table.drop(columns=["epoch_duration", "run_duration"]).equals(df)
    assert len(json.loads((tmp_path / "runs" / "runs.json").read_text())) == len(df)
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["env.json", "sweep.csv", "sweep_best.json"]

    best = json.loads((tmp_path / "metrics" / "sweep_best.json").read_text())
    finals = df.groupby("run").last()
    assert best["val_accuracy"] == pytest.approx(finals["val_accuracy"].max())
    assert best["params"] == {"lr": finals.loc[best["run"], "lr"], "epochs": finals.loc[best["run"], "epochs"]}

    names = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert names == ["lr=0.001,epochs=1", "lr=0.001,epochs=2", "lr=0.01,epochs=1", "lr=0.01,epochs=2"]
    acc = EventAccumulator(str(tmp_path / "runs" / "lr=0.01,epochs=2"), size_guidance={"histograms": 0}).Reload()
    assert len(acc.Scalars("Accuracy/val")) == 2
    assert acc.Scalars("hparam/val_accuracy")[0].value == pytest.approx(finals.loc[2, "val_accuracy"])
    assert "conv1.weight.grad" in acc.Tags()["histograms"]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    table = [line.split() for line in proc.stderr.splitlines() if line.endswith("  lr=0.01,epochs=2")]
    assert [row[:2] for row in table] == [["2", "1"], ["2", "2"]]  # the live table: a row per epoch


def test_sweep_runs_take_grid_values_over_defaults_and_only_runtime_keys_from_the_top_level():
    from fmnist.tracking import RunBuilder

    raw = {"lr": 0.5, "optimizer": "adam", "batch_size": 7, "device": "cpu", "cpu_kernel": "torch", "numerics": "native",
           "precision": "bfloat16", "sweep": {"lr": [0.01, 0.02], "epochs": [3]}}
    runs = RunBuilder.get_runs(params.sweep_grid(raw))
    configs = params.sweep_runs(raw, runs)
    defaults = params.TrainParams()
    assert [(c.lr, c.epochs) for c in configs] == [(0.01, 3), (0.02, 3)]
    assert all(c.optimizer == defaults.optimizer and c.batch_size == defaults.batch_size for c in configs)
    assert all((c.device, c.cpu_kernel, c.numerics, c.precision) == ("cpu", "torch", "native", "bfloat16")
               for c in configs)
