"""The project's training path computes what the seed's DataLoader loop computes, only faster."""

import io

import pytest
import torch
from torch.utils.data import DataLoader

from fmnist import params
from fmnist.data import FashionMNIST, load_processed
from fmnist.engine import make_optimizer, to_device, train_one_epoch
from fmnist.models import build_model
from bench.reference import seed_network, seed_train_epoch
from fmnist.tracking import RunBuilder, RunManager

from .test_kernels import require_fused_kernel


def one_epoch_both_ways(processed_small, p):
    """One epoch of the project's path and of the seed's loop from the same weights and batch order."""
    data = load_processed(processed_small)
    model = build_model("network", seed=0, cpu_kernel=p.cpu_kernel)
    model = model.to(memory_format=torch.channels_last)  # as train_run does
    seed_model = seed_network(seed=0)  # the same weights, on PyTorch's layers with ReLU before pooling

    # the project's path: data on the device, batches as slices of a seeded permutation
    train = to_device(data.train, data.mean, data.std, torch.device("cpu"))
    manager = RunManager(stream=io.StringIO())
    manager.begin_run(RunBuilder.get_runs({"batch_size": [p.batch_size]})[0], model)
    manager.begin_epoch()
    train_one_epoch(model, train, make_optimizer(model, p), None, p, torch.Generator().manual_seed(p.seed), manager)
    ours = manager.end_epoch()

    # the seed's loop over a Dataset and DataLoader, fed the same permutation
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(p.seed)).tolist()
    loader = DataLoader(FashionMNIST(processed_small, "train", normalize=True), batch_size=p.batch_size, sampler=order)
    if p.optimizer == "adam":
        seed_opt = torch.optim.Adam(seed_model.parameters(), lr=p.lr)
    else:
        seed_opt = torch.optim.SGD(seed_model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=True)
    seed_loss, seed_correct = seed_train_epoch(seed_model, loader, seed_opt)
    return ours, seed_loss, seed_correct / len(train), model, seed_model


@pytest.mark.parametrize("cpu_kernel", ["fused", "torch"])
@pytest.mark.parametrize("batch_size", [32, 100])
def test_one_epoch_matches_the_seed_loop_given_the_same_weights_and_batch_order(processed_small, batch_size,
                                                                                cpu_kernel):
    if cpu_kernel == "fused":
        require_fused_kernel()
    p = params.train_params({}, optimizer="adam", lr=0.005, weight_decay=0.0, batch_size=batch_size,
                            schedule="constant", seed=3, cpu_kernel=cpu_kernel)
    ours, seed_loss, seed_accuracy, model, seed_model = one_epoch_both_ways(processed_small, p)
    assert ours["loss"] == pytest.approx(seed_loss, rel=1e-5)
    assert ours["accuracy"] == pytest.approx(seed_accuracy, abs=1.01 / 600)  # at most one of 600 predictions apart
    if cpu_kernel == "torch":  # the same kernels in another order: the weights agree to rounding
        for (name, a), b in zip(model.named_parameters(), seed_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # With the fused kernel the float additions run in another order, so a conv output within
    # rounding of 0 can pass the ReLU on one path and not the other. Adam divides each step by the
    # gradient's running scale, so for a unit that is almost never live such a flip moves its
    # weights by up to lr: the weights are compared under SGD below, where a flip moves them by
    # one gradient term.


def test_sgd_epoch_with_the_fused_kernel_gives_the_seed_loops_weights(processed_small):
    # the weights move by about 2.5e-3 in this epoch; a wrong gradient would put them that far apart
    require_fused_kernel()
    p = params.train_params({}, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=100,
                            schedule="constant", seed=3, cpu_kernel="fused")
    ours, seed_loss, _, model, seed_model = one_epoch_both_ways(processed_small, p)
    assert ours["loss"] == pytest.approx(seed_loss, rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), seed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
