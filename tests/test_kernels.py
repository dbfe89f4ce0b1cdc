"""The fused conv -> pool -> ReLU C kernel against PyTorch's own layers."""

import pytest
import torch
import torch.nn.functional as F

from fmnist import kernels
from fmnist.errors import PipelineError
from fmnist.models import build_model

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernels fall back to PyTorch")


def reference(x, conv):
    return F.relu(F.max_pool2d(F.conv2d(x, conv.weight, conv.bias), 2))


def grads(out, x, conv, g):
    return torch.autograd.grad(out, (x, conv.weight, conv.bias), g)


@needs_kernels
@pytest.mark.parametrize("c_in,c_out,size", [(1, 5, 28), (5, 12, 12)])
def test_values_and_gradients_match_pytorch(c_in, c_out, size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, 5)
    x = torch.randn(33, c_in, size, size)  # odd batch: images split unevenly between threads
    x[:3] = 0.0  # blank images: every window ties, and the ReLU cuts every output of some channels
    x.requires_grad_(True)
    fused = kernels.conv_pool_relu(x, conv)
    ref = reference(x, conv)
    assert fused.shape == ref.shape
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(grads(fused, x, conv, g), grads(ref, x, conv, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_ties_route_the_gradient_to_the_first_maximum_like_max_pool2d():
    conv = torch.nn.Conv2d(1, 5, 5)
    with torch.no_grad():
        conv.weight.fill_(0.0)
        conv.bias.fill_(1.0)  # every conv output is exactly 1: all four values of each window tie
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    g = torch.randn(2, 5, 12, 12)
    fused, ref = grads(kernels.conv_pool_relu(x, conv), x, conv, g), grads(reference(x, conv), x, conv, g)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_is_used_and_is_deterministic():
    model = build_model("network")
    x = torch.randn(100, 1, 28, 28)
    y = torch.randint(0, 10, (100,))

    def step():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    first, second = step(), step()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with kernels.disabled():
        torch_path = step()
    # the same gradients up to float rounding, but not bit-equal: the fused path really ran
    assert not all(torch.equal(a, b) for a, b in zip(first, torch_path))
    for a, b in zip(first, torch_path):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated, add_graph uses it
def test_other_shapes_dtypes_settings_and_tracing_use_pytorch(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels._ConvPoolReLU, "apply", lambda *a: calls.append(a))
    conv = torch.nn.Conv2d(1, 5, 5)
    kernels.conv_pool_relu(torch.randn(2, 1, 32, 32), conv)  # a size it was not built for
    kernels.conv_pool_relu(torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.nn.Conv2d(1, 5, 5).double())
    with pytest.raises(RuntimeError, match="channels"):  # PyTorch's error, not a read past the input's end
        kernels.conv_pool_relu(torch.randn(2, 1, 12, 12), torch.nn.Conv2d(5, 12, 5))
    kernels.conv_pool_relu(torch.randn(2, 1, 28, 28), torch.nn.Conv2d(1, 5, 5, padding=2))
    kernels.conv_pool_relu(torch.randn(2, 1, 28, 28), torch.nn.Conv2d(1, 5, 5, bias=False))
    torch.jit.trace(build_model("network"), torch.randn(2, 1, 28, 28), check_trace=False)  # add_graph traces the model
    assert calls == []


def test_without_a_compiler_it_falls_back_to_pytorch_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level("WARNING", logger="fmnist.kernels"):
        assert kernels.library() is None
    assert "run on PyTorch's kernels" in caplog.text
    conv = torch.nn.Conv2d(1, 5, 5)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(kernels.conv_pool_relu(x, conv), reference(x, conv))


def test_fmnist_kernels_torch_switches_them_off(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("FMNIST_KERNELS", "torch")
    assert kernels.library() is None


def test_an_unknown_fmnist_kernels_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("FMNIST_KERNELS", "pytorch")
    with pytest.raises(PipelineError, match="FMNIST_KERNELS must be 'c' .* got 'pytorch'"):
        kernels.conv_pool_relu(torch.randn(2, 1, 28, 28), torch.nn.Conv2d(1, 5, 5))


@needs_kernels
def test_fewer_threads_than_asked_still_give_the_right_gradients():
    # a batch smaller than the thread count leaves threads without images
    conv = torch.nn.Conv2d(5, 12, 5)
    x = torch.randn(1, 5, 12, 12, requires_grad=True)
    g = torch.randn(1, 12, 4, 4)
    for a, b in zip(grads(kernels.conv_pool_relu(x, conv), x, conv, g), grads(reference(x, conv), x, conv, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_second_derivatives_are_refused_not_wrong():
    conv = torch.nn.Conv2d(1, 5, 5)
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    (gx,) = torch.autograd.grad(kernels.conv_pool_relu(x, conv).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|not have a grad_fn"):
        gx.sum().backward()
