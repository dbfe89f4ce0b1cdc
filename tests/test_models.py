import pytest
import torch

from fmnist.errors import ParamsError
from fmnist.models import FastNet, Network, build_model, count_parameters
from bench.reference import seed_network

from .test_kernels import require_fused_kernel


def test_network_is_the_seeds_architecture():
    net = Network()
    assert count_parameters(net) == 32_672
    assert (net.conv1.in_channels, net.conv1.out_channels, net.conv1.kernel_size) == (1, 5, (5, 5))
    assert (net.conv2.in_channels, net.conv2.out_channels, net.conv2.kernel_size) == (5, 12, (5, 5))
    assert [(l.in_features, l.out_features) for l in (net.fc1, net.fc2, net.out)] == [(192, 120), (120, 60), (60, 10)]


@pytest.mark.parametrize("model", [Network(cpu_kernel="torch"), FastNet(8)])
def test_forward_returns_logits_not_probabilities(model):
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    assert not torch.allclose(out.sum(1), torch.ones(4))  # a softmax output would sum to one
    assert (out < 0).any()


def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("network", seed=7, cpu_kernel="torch")
    after = torch.rand(1)
    b = build_model("network", seed=7, cpu_kernel="torch")
    c = build_model("network", seed=8, cpu_kernel="torch")
    assert torch.equal(before, after)
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)


def test_unknown_model_name_is_a_params_error():
    with pytest.raises(ParamsError, match="model must be one of"):
        build_model("vgg")


def test_cpu_kernel_is_the_networks_declared_choice_and_checked():
    assert build_model("network", 16, 0, "torch").cpu_kernel == "torch"  # positional, as callers pass it
    assert not hasattr(build_model("fastnet", cpu_kernel="fused"), "cpu_kernel")  # fastnet ignores it
    for bad in ("c", "pytorch"):
        with pytest.raises(ParamsError, match="cpu_kernel must be one of fused, torch, got"):
            build_model("network", cpu_kernel=bad)
        with pytest.raises(ParamsError, match="cpu_kernel must be one of"):
            Network(cpu_kernel=bad)


@pytest.mark.parametrize("cpu_kernel", ["fused", "torch"])
def test_network_forward_and_gradients_equal_the_seeds_relu_then_pool_order(cpu_kernel):
    if cpu_kernel == "fused":
        require_fused_kernel()
    net = build_model("network", seed=1, cpu_kernel=cpu_kernel)
    seed = seed_network(seed=1)
    x = torch.randn(16, 1, 28, 28)

    def run(model):
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_a, g_a = run(net)
    out_b, g_b = run(seed)
    if cpu_kernel == "torch":  # pooling before the ReLU picks the same values: bit-equal outputs
        assert torch.equal(out_a, out_b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    rtol, atol = (1e-4, 1e-5) if cpu_kernel == "fused" else (1e-6, 1e-7)  # fused: another order of additions
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
