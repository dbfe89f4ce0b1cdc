import io

import pytest
import torch
import torch.nn.functional as F

from fmnist import params
from fmnist.checkpoint import load_checkpoint, save_checkpoint
from fmnist.data import load_processed
from fmnist.engine import DeviceSplit, evaluate, predict, to_device, train_run
from fmnist.errors import DataError
from fmnist.tracking import RunManager

SMALL = dict(epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def small(processed_small):
    data = load_processed(processed_small)
    dev = torch.device("cpu")
    return data, *(to_device(s, data.mean, data.std, dev) for s in (data.train, data.val, data.test))


def train(small, **overrides):
    _, tr, va, _ = small
    p = params.train_params({}, **{**SMALL, **overrides})
    return train_run(p, tr, va, RunManager(stream=io.StringIO()))


@pytest.mark.parametrize("overrides", [{}, {"model": "fastnet", "width": 8, "flip": True, "optimizer": "sgd"}])
def test_same_params_give_bit_identical_weights_and_metrics(small, overrides):
    (m1, r1), (m2, r2) = train(small, **overrides), train(small, **overrides)
    assert r1 == r2
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_a_different_seed_gives_different_weights(small):
    (m1, _), (m2, _) = train(small), train(small, seed=1)
    assert not torch.equal(m1.conv1.weight, m2.conv1.weight)


def test_training_learns_separable_data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (2000,), generator=g)
    x = torch.randn(2000, 1, 28, 28, generator=g) * 0.1
    x[torch.arange(2000), 0, y, y] += 3.0  # the class is written on the diagonal
    data = DeviceSplit(x, y)
    p = params.train_params({}, epochs=3, batch_size=50, lr=0.01, optimizer="adam")
    model, metrics = train_run(p, data, data, RunManager(stream=io.StringIO()))
    assert metrics["val_accuracy"] > 0.95


def test_predict_runs_without_autograd_and_matches_batching(small):
    model, _ = train(small, epochs=1)
    _, _, va, _ = small
    a, b = predict(model, va.x, batch_size=7), predict(model, va.x, batch_size=1000)
    assert not a.requires_grad and a.shape == (len(va), 10)
    torch.testing.assert_close(a, b)
    assert torch.is_grad_enabled()  # no global toggle left behind


def test_tta_averages_the_mirror_images_logits(small):
    model, _ = train(small, epochs=1)
    x = small[2].x[:5]
    expected = (predict(model, x) + predict(model, x.flip(-1))) / 2
    torch.testing.assert_close(predict(model, x, tta=True), expected)


def test_evaluate_reports_mean_loss_and_accuracy(small):
    model, _ = train(small, epochs=1)
    te = small[3]
    loss, acc, logits = evaluate(model, te)
    assert loss == pytest.approx(F.cross_entropy(logits, te.y).item())
    assert acc == pytest.approx((logits.argmax(1) == te.y).float().mean().item())


def test_checkpoint_round_trip_predicts_the_same(small, tmp_path):
    model, _ = train(small, epochs=1, model="fastnet", width=8)
    p = params.train_params({}, model="fastnet", width=8)
    save_checkpoint(tmp_path / "m.pt", model, p, 0.28, 0.35)
    loaded, info = load_checkpoint(tmp_path / "m.pt")
    assert info["model"] == "fastnet" and info["normalize"] == {"mean": 0.28, "std": 0.35}
    x = small[3].x[:20]
    torch.testing.assert_close(predict(loaded, x), predict(model, x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


def test_corrupt_checkpoint_is_a_one_line_data_error(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="m.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "m.pt")
    with pytest.raises(DataError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("total", [1, 2, 3, 4, 7, 550])
def test_one_cycle_warms_up_to_the_peak_and_anneals_for_any_run_length(total):
    from fmnist.engine import one_cycle

    factors = [one_cycle(s, total) for s in range(total)]
    assert factors[0] == pytest.approx(1 / 25) or total == 1 and factors[0] <= 1
    assert max(factors) <= 1.0
    peak = factors.index(max(factors))
    assert all(a <= b for a, b in zip(factors[:peak], factors[1 : peak + 1]))  # rises to the peak
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1 :]))    # then only falls
    if total >= 4:
        assert max(factors) == pytest.approx(1.0) and one_cycle(total, total) == pytest.approx(1e-4)


def test_tiny_runs_with_large_batches_train(small):
    from fmnist.models import build_model

    model, metrics = train(small, epochs=1, batch_size=1000)  # a single optimisation step
    assert not torch.equal(model.conv1.weight, build_model("network").conv1.weight)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_the_same_model_saves_to_the_same_bytes(small, tmp_path):
    model, _ = train(small, epochs=1)
    p = params.train_params({}, **SMALL)
    for name in ("a.pt", "b.pt"):
        save_checkpoint(tmp_path / name, model, p, 0.28, 0.35)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
