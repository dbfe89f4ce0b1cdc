"""The project's training path computes what the seed's DataLoader loop computes, only faster."""

import copy
import io

import pytest
import torch
from torch.utils.data import DataLoader

from fmnist import params
from fmnist.data import FashionMNIST, load_processed
from fmnist.engine import make_optimizer, to_device, train_one_epoch
from fmnist.models import build_model
from fmnist.reference import seed_train_epoch
from fmnist.tracking import RunManager, RunBuilder


@pytest.mark.parametrize("batch_size", [32, 100])
def test_one_epoch_matches_the_seed_loop_given_the_same_weights_and_batch_order(processed_small, batch_size):
    p = params.train_params({}, optimizer="adam", lr=0.005, weight_decay=0.0, batch_size=batch_size,
                            schedule="constant", seed=3)
    data = load_processed(processed_small)
    model = build_model("network", seed=0)
    seed_model = copy.deepcopy(model)
    model = model.to(memory_format=torch.channels_last)  # as train_run does

    # the project's path: data on the device, batches as slices of a seeded permutation
    train = to_device(data.train, data.mean, data.std, torch.device("cpu"))
    manager = RunManager(stream=io.StringIO())
    manager.begin_run(RunBuilder.get_runs({"batch_size": [batch_size]})[0], model)
    manager.begin_epoch()
    train_one_epoch(model, train, make_optimizer(model, p), None, p, torch.Generator().manual_seed(p.seed), manager)
    ours = manager.end_epoch()

    # the seed's loop over a Dataset and DataLoader, fed the same permutation
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(p.seed)).tolist()
    loader = DataLoader(FashionMNIST(processed_small, "train", normalize=True), batch_size=batch_size, sampler=order)
    seed_opt = torch.optim.Adam(seed_model.parameters(), lr=p.lr)
    seed_loss, seed_correct = seed_train_epoch(seed_model, loader, seed_opt)

    assert ours["loss"] == pytest.approx(seed_loss, rel=1e-5)
    assert round(ours["accuracy"] * len(train)) == seed_correct
    for (name, a), b in zip(model.named_parameters(), seed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
