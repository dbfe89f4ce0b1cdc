import io
import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmnist import params
from fmnist.data import load_processed
from fmnist.engine import DeviceSplit, evaluate, predict, to_device, train_one_epoch, train_run, training_state
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


# -- what the model sees: a probe module in place of a real network -----------------------------

class Probe(nn.Module):
    """A linear model that records every forward pass: its input, its output, its mode and the optimizer's rate."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)
        self.optimizer = None  # set after the engine makes one, to read the rate each step uses
        self.inputs, self.outputs, self.modes, self.rates = [], [], [], []

    def forward(self, x):
        out = self.linear(x.flatten(1))
        self.inputs.append(x.detach().clone())
        self.outputs.append(out.detach().clone())
        self.modes.append(self.training)
        if self.optimizer is not None:
            self.rates.append(self.optimizer.param_groups[0]["lr"])
        return out


def distinct_images(n: int) -> DeviceSplit:
    """``n`` random images, each different from every other and from its own mirror image."""
    g = torch.Generator().manual_seed(0)
    return DeviceSplit(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def source(image: torch.Tensor, data: DeviceSplit) -> tuple[int, bool]:
    """(index in ``data``, mirrored left to right?) of one image the model saw."""
    for i, x in enumerate(data.x):
        if torch.equal(image, x):
            return i, False
        if torch.equal(image, x.flip(-1)):
            return i, True
    raise AssertionError("the model saw an image that is neither a training image nor its left-right mirror")


def one_epoch(data: DeviceSplit, tracker=None, **overrides) -> Probe:
    probe = Probe()
    p = params.train_params({}, **{"epochs": 1, **overrides})
    optimizer, scheduler, generator = training_state(probe, p, len(data), torch.device("cpu"))
    probe.optimizer = optimizer
    for _ in range(p.epochs):
        train_one_epoch(probe, data, optimizer, scheduler, p, generator, tracker)
    return probe


@pytest.mark.parametrize("flip", [True, False])
def test_flip_mirrors_training_images_left_to_right_and_leaves_the_others_unchanged(flip):
    data = distinct_images(20)
    seen = [source(image, data) for batch in one_epoch(data, flip=flip, batch_size=8).inputs for image in batch]
    assert sorted(i for i, _ in seen) == list(range(20))
    mirrored = [m for _, m in seen]
    assert (any(mirrored) and not all(mirrored)) if flip else not any(mirrored)


def test_an_epoch_sees_every_image_once_and_weights_the_short_last_batch_by_its_size():
    data = distinct_images(20)
    manager = RunManager(stream=io.StringIO())
    manager.begin_run(namedtuple("Run", "name")("probe"), nn.Identity())
    manager.begin_epoch()
    probe = one_epoch(data, tracker=manager, batch_size=8)
    row = manager.end_epoch()
    assert [len(b) for b in probe.inputs] == [8, 8, 4]  # 20 = 8 + 8 + a short last batch of 4
    indices = [[source(image, data)[0] for image in batch] for batch in probe.inputs]
    assert sorted(sum(indices, [])) == list(range(20))
    losses = [F.cross_entropy(out, data.y[idx]).item() for out, idx in zip(probe.outputs, indices)]
    correct = sum((out.argmax(1) == data.y[idx]).sum().item() for out, idx in zip(probe.outputs, indices))
    assert row["loss"] == pytest.approx((8 * losses[0] + 8 * losses[1] + 4 * losses[2]) / 20)
    assert row["accuracy"] == pytest.approx(correct / 20)


def test_predict_and_evaluate_run_the_model_in_eval_mode_and_training_in_train_mode():
    data = distinct_images(20)
    probe = Probe()  # a new module is in training mode
    predict(probe, data.x, batch_size=8, tta=True)
    assert probe.modes == [False] * 6  # three batches, each and its mirror
    probe.train().modes.clear()
    evaluate(probe, data)
    assert probe.modes == [False]
    probe = Probe().eval()
    p = params.train_params({}, batch_size=8)
    optimizer, scheduler, generator = training_state(probe, p, len(data), torch.device("cpu"))
    train_one_epoch(probe, data, optimizer, scheduler, p, generator)
    assert probe.modes == [True] * 3


@pytest.mark.parametrize("schedule", ["onecycle", "constant"])
def test_the_learning_rate_of_each_step_follows_the_schedule(schedule):
    # 20 images in batches of 5 for 2 epochs: 8 steps, the first 2 (25%) warming up
    rates = one_epoch(distinct_images(20), schedule=schedule, lr=0.1, batch_size=5, epochs=2).rates
    assert len(rates) == 8
    if schedule == "constant":
        assert rates == [0.1] * 8
        return
    assert rates[0] == pytest.approx(0.1 / 25)  # first step: lr / 25
    assert rates[1] == pytest.approx(0.1 * (1 / 25 + (1 - 1 / 25) / 2))  # halfway up the linear warm-up
    assert rates[2] == pytest.approx(0.1)  # the peak, at 25% of the steps
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # then only falls
    # last step: cosine from the peak towards lr / 1e4, 5 of its 6 steps done
    assert rates[-1] == pytest.approx(0.1 * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 5 / 6))))
