import io
import json

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist.models import Network
from fmnist.tensorboard_logs import image_grid
from fmnist.tracking import RunBuilder, RunManager


def test_run_builder_gives_the_cartesian_product_as_named_tuples():
    runs = RunBuilder.get_runs({"lr": [0.01, 0.001], "batch_size": [1000, 10000]})
    assert len(runs) == 4
    assert (runs[0].lr, runs[0].batch_size) == (0.01, 1000)
    assert (runs[3].lr, runs[3].batch_size) == (0.001, 10000)
    assert str(runs[0]) == "Run(lr=0.01, batch_size=1000)"


def test_loss_is_averaged_over_the_true_number_of_samples():
    m = RunManager(stream=io.StringIO())
    m.begin_run(RunBuilder.get_runs({"lr": [0.1]})[0], Network())
    m.begin_epoch()
    m.track_loss(torch.tensor(1.0), 100)  # a full batch of 100
    m.track_loss(torch.tensor(4.0), 20)   # a short last batch of 20
    m.track_num_correct(torch.eye(10)[[0, 1, 2]], torch.tensor([0, 1, 9]))
    row = m.end_epoch(val_loss=0.5, val_accuracy=0.25)
    assert row["loss"] == pytest.approx((100 * 1.0 + 20 * 4.0) / 120)
    assert row["accuracy"] == pytest.approx(2 / 120)
    assert (row["run"], row["epoch"], row["lr"]) == (1, 1, 0.1)


def test_save_writes_csv_and_json_with_the_same_rows(tmp_path):
    m = RunManager(stream=io.StringIO())
    for run in RunBuilder.get_runs({"lr": [0.1, 0.2]}):
        m.begin_run(run, Network())
        for _ in range(2):
            m.begin_epoch()
            m.track_loss(torch.tensor(1.0), 10)
            m.end_epoch()
        m.end_run()
    m.save(tmp_path / "results")
    df = pd.read_csv(tmp_path / "results.csv")
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(df) == len(rows) == 4
    assert df["run"].tolist() == [1, 1, 2, 2] and df["epoch"].tolist() == [1, 2, 1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "epoch_duration", "run_duration", "lr"} <= set(df.columns)


def test_progress_table_prints_a_row_per_epoch():
    out = io.StringIO()
    m = RunManager(stream=out)
    m.begin_run(RunBuilder.get_runs({"lr": [0.1]})[0], Network())
    m.begin_epoch()
    m.track_loss(torch.tensor(0.5), 10)
    m.end_epoch(0.25, 0.875)
    header, row = out.getvalue().splitlines()
    assert header.split()[:4] == ["run", "epoch", "loss", "accuracy"]
    assert "0.5000" in row and "87.50%" in row and "lr=0.1" in row


def test_tensorboard_log_has_scalars_histograms_image_graph_and_hparams(tmp_path):
    net = Network()
    m = RunManager(log_root=tmp_path, stream=io.StringIO())
    run = RunBuilder.get_runs({"lr": [0.1]})[0]
    m.begin_run(run, net, example=torch.randn(8, 1, 28, 28))
    m.begin_epoch()
    loss = net(torch.randn(4, 1, 28, 28)).sum()
    loss.backward()
    m.track_loss(loss, 4)
    m.end_epoch(0.3, 0.9)
    m.end_run(hparams={"lr": 0.1}, metrics={"val_accuracy": 0.9})
    acc = EventAccumulator(str(tmp_path / "lr=0.1"), size_guidance={"histograms": 0}).Reload()
    tags = acc.Tags()
    assert {"Loss/train", "Accuracy/train", "Loss/val", "Accuracy/val", "hparam/val_accuracy"} <= set(tags["scalars"])
    assert acc.Scalars("Accuracy/val")[0].value == pytest.approx(0.9)
    assert {"conv1.weight", "conv1.weight.grad", "out.bias", "out.bias.grad"} <= set(tags["histograms"])
    assert "images" in tags["images"] and tags["graph"]
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins


def log_one_run(root, x):
    torch.manual_seed(0)
    net = Network()
    m = RunManager(log_root=root, stream=io.StringIO())
    m.begin_run(RunBuilder.get_runs({"lr": [0.1]})[0], net, example=x)
    for epoch in range(2):
        m.begin_epoch()
        loss = net(x).sum()
        loss.backward()
        m.track_loss(loss, len(x))
        m.end_epoch(0.3, 0.9)
    m.end_run(hparams={"lr": 0.1}, metrics={"val_accuracy": 0.9})
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tensorboard_logs_of_the_same_run_are_the_same_bytes(tmp_path):
    # DVC hashes runs/train and runs/sweep into dvc.lock: wall-clock stamps would change it on every rerun
    import time

    x = torch.randn(8, 1, 28, 28)
    first = log_one_run(tmp_path / "a", x)
    time.sleep(1.1)  # a different second for TensorBoard's file names and stamps
    second = log_one_run(tmp_path / "b", x)
    assert first == second
    assert [p.name for p in first] == ["events.out.tfevents.0000000000.fmnist"]  # the hparams writer's file merged in
    acc = EventAccumulator(str(tmp_path / "a" / "lr=0.1"), size_guidance={"histograms": 0}).Reload()
    assert [(s.step, s.wall_time, s.value) for s in acc.Scalars("Accuracy/val")] == [
        (1, 1.0, pytest.approx(0.9)), (2, 2.0, pytest.approx(0.9))]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert acc.Tags()["graph"] and "images" in acc.Tags()["images"]


@pytest.mark.parametrize("n", [64, 13, 8, 2])  # (make_grid returns 1 image unpadded)
def test_the_image_grid_is_torchvisions_make_grid_pixel_for_pixel(n):
    from torchvision.utils import make_grid

    images = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
    assert torch.equal(image_grid(images, nrow=8), make_grid(images, nrow=8, normalize=True))
