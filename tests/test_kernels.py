"""The fused conv -> pool -> ReLU operator (fmnist::conv_pool_relu) against PyTorch's own layers."""

import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fmnist import kernels
from fmnist.errors import PipelineError
from fmnist.models import Network, build_model

from .conftest import ROOT, in_ci

LAYERS = [(1, 5, 28), (5, 12, 12)]  # conv1 and conv2 of the seed Network: in, out channels, image size


def require_fused_kernel() -> None:
    """Skip the calling test when the operator is not built; under CI=true fail it instead."""
    if not kernels.available():
        if in_ci():
            pytest.fail(f"CI=true and the fused CPU kernel was not built (status: {kernels.status()}); CI must build "
                        "it: make, or pip install --no-build-isolation -e .")
        pytest.skip(f"fused CPU kernel: {kernels.status()}")


@pytest.fixture
def fused():
    require_fused_kernel()


@pytest.fixture
def threads():
    """Restores torch's thread count after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def reference(x, conv):
    return F.relu(F.max_pool2d(F.conv2d(x, conv.weight, conv.bias), 2))


def grads(out, x, conv, g):
    return torch.autograd.grad(out, (x, conv.weight, conv.bias), g)


def layer_inputs(c_in, c_out, size, n=33, seed=0):
    """A conv layer and a batch for it: odd size, three blank images (every window ties, channels cut)."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, 5)
    x = torch.randn(n, c_in, size, size)
    x[:3] = 0.0
    return conv, x.requires_grad_(True)


@pytest.mark.parametrize("c_in,c_out,size", LAYERS)
def test_values_and_gradients_match_pytorch(fused, c_in, c_out, size):
    conv, x = layer_inputs(c_in, c_out, size)
    out = kernels.conv_pool_relu(x, conv)
    ref = reference(x, conv)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(grads(out, x, conv, g), grads(ref, x, conv, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ties_route_the_gradient_to_the_first_maximum_like_max_pool2d(fused):
    conv = torch.nn.Conv2d(1, 5, 5)
    with torch.no_grad():
        conv.weight.fill_(0.0)
        conv.bias.fill_(1.0)  # every conv output is exactly 1: all four values of each window tie
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    g = torch.randn(2, 5, 12, 12)
    for a, b in zip(grads(kernels.conv_pool_relu(x, conv), x, conv, g), grads(reference(x, conv), x, conv, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_batches_smaller_than_a_gradient_block_or_the_thread_count_are_right(fused, n):
    conv, x = layer_inputs(5, 12, 12, n=n)
    g = torch.randn(n, 12, 4, 4)
    for a, b in zip(grads(kernels.conv_pool_relu(x, conv), x, conv, g), grads(reference(x, conv), x, conv, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_empty_batch_gives_empty_outputs_and_zero_weight_gradients(fused):
    conv = torch.nn.Conv2d(1, 5, 5)
    out, idx = torch.ops.fmnist.conv_pool_relu(torch.empty(0, 1, 28, 28), conv.weight.detach(), conv.bias.detach())
    assert out.shape == idx.shape == (0, 5, 12, 12)
    gx, gw, gb = torch.ops.fmnist.conv_pool_relu_backward(torch.empty(0, 1, 28, 28), conv.weight.detach(), out, idx,
                                                          True)
    assert gx.shape == (0, 1, 28, 28) and not gw.any() and not gb.any()


@pytest.mark.parametrize("c_in,c_out,size", LAYERS)
def test_results_are_bit_identical_for_any_thread_count(fused, threads, c_in, c_out, size):
    conv, x = layer_inputs(c_in, c_out, size, n=37)  # 37: uneven over 2, 3 and 4 threads and over blocks
    g = torch.randn(37, c_out, (size - 4) // 2, (size - 4) // 2)
    results = {}
    for n_threads in (1, 2, 3, 4):
        torch.set_num_threads(n_threads)
        out = kernels.conv_pool_relu(x, conv)
        results[n_threads] = (out, *grads(out, x, conv, g))
    for n_threads in (2, 3, 4):
        for name, a, b in zip(("out", "grad x", "grad weight", "grad bias"), results[1], results[n_threads]):
            assert torch.equal(a, b), f"{name} with {n_threads} threads differs from 1 thread"


def test_network_uses_the_operator_and_is_deterministic(fused):
    fused_model, torch_model = build_model("network"), build_model("network", cpu_kernel="torch")
    assert fused_model.cpu_kernel == "fused" and torch_model.cpu_kernel == "torch"
    x = torch.randn(100, 1, 28, 28)
    y = torch.randint(0, 10, (100,))

    def step(model):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    first, second, torch_path = step(fused_model), step(fused_model), step(torch_model)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # the same gradients up to float rounding, but not bit-equal: the operator really ran
    assert not all(torch.equal(a, b) for a, b in zip(first, torch_path))
    for a, b in zip(first, torch_path):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_kernel_torch_and_disabled_never_call_the_operator(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_fused", lambda *a: calls.append(a))
    x = torch.randn(2, 1, 28, 28)
    build_model("network", cpu_kernel="torch")(x)
    with kernels.disabled():
        Network(cpu_kernel="fused")(x)
    assert calls == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated, add_graph uses it
def test_other_shapes_dtypes_settings_and_tracing_use_pytorch(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_fused", lambda *a: calls.append(a))
    conv = torch.nn.Conv2d(1, 5, 5)
    kernels.conv_pool_relu(torch.randn(2, 1, 32, 32), conv)  # a size it was not built for
    kernels.conv_pool_relu(torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.nn.Conv2d(1, 5, 5).double())
    with pytest.raises(RuntimeError, match="channels"):  # PyTorch's error, not a read past the input's end
        kernels.conv_pool_relu(torch.randn(2, 1, 12, 12), torch.nn.Conv2d(5, 12, 5))
    kernels.conv_pool_relu(torch.randn(2, 1, 28, 28), torch.nn.Conv2d(1, 5, 5, padding=2))
    kernels.conv_pool_relu(torch.randn(2, 1, 28, 28), torch.nn.Conv2d(1, 5, 5, bias=False))
    torch.jit.trace(Network(cpu_kernel="fused"), torch.randn(2, 1, 28, 28), check_trace=False)  # as add_graph does
    assert calls == []


def test_the_operator_refuses_shapes_it_was_not_built_for(fused):
    with pytest.raises(RuntimeError, match="built for the seed Network's two layers only"):
        torch.ops.fmnist.conv_pool_relu(torch.randn(2, 1, 32, 32), torch.randn(5, 1, 5, 5), torch.randn(5))
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.fmnist.conv_pool_relu(torch.randn(2, 1, 28, 28).double(), torch.randn(5, 1, 5, 5), torch.randn(5))


def test_second_derivatives_are_refused_not_wrong(fused):
    conv = torch.nn.Conv2d(1, 5, 5)
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    (gx,) = torch.autograd.grad(kernels.conv_pool_relu(x, conv).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("c_in,c_out,size", LAYERS)
def test_opcheck_schema_fake_shapes_autograd_registration_and_aot_dispatch(fused, c_in, c_out, size):
    conv, x = layer_inputs(c_in, c_out, size, n=6)
    weight, bias = conv.weight.detach().requires_grad_(True), conv.bias.detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.fmnist.conv_pool_relu.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.fmnist.conv_pool_relu.default, (x.detach(), weight, bias))  # no input gradient
    out, idx = torch.ops.fmnist.conv_pool_relu(x.detach(), weight.detach(), bias.detach())
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.fmnist.conv_pool_relu_backward.default,
                              (x.detach(), weight.detach(), torch.randn_like(out), idx, input_grad))


@pytest.mark.parametrize("c_in,c_out,size", LAYERS)
def test_gradients_match_float32_central_differences(fused, c_in, c_out, size):
    # gradcheck wants float64 and the operator is float32 only, so this is gradcheck's test done by
    # hand in float32: nudge one element (40 picked at random per input) by +-eps and compare the
    # change of sum(g * out) with the gradient. Where the nudge leaves every window's maximum and
    # ReLU cut (idx) as they were, the operator is exactly linear along it, so the two differ only
    # by float32 rounding of the outputs (well below 1%); a wrong gradient is off by its own size.
    op = torch.ops.fmnist.conv_pool_relu
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(c_in, c_out, 5)
    inputs = [torch.randn(2, c_in, size, size), conv.weight.detach(), conv.bias.detach()]
    g = torch.randn(op(*inputs)[0].shape)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    analytic = torch.autograd.grad(op(*leaves)[0], leaves, g)
    loss = lambda args: (op(*args)[0].double() * g.double()).sum().item()  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    for i, grad in enumerate(analytic):
        picks, checked = torch.randperm(grad.numel(), generator=gen)[:40].tolist(), 0
        for j in picks:
            for eps in (1e-2, 1e-3, 1e-4):
                nudge = torch.zeros(grad.numel())
                nudge[j] = eps
                plus, minus = list(inputs), list(inputs)
                plus[i], minus[i] = inputs[i] + nudge.view(grad.shape), inputs[i] - nudge.view(grad.shape)
                if torch.equal(op(*plus)[1], op(*minus)[1]):
                    numeric = (loss(plus) - loss(minus)) / (2 * eps)
                    assert numeric == pytest.approx(grad.reshape(-1)[j].item(), rel=1e-2, abs=1e-2), (i, j, eps)
                    checked += 1
                    break
        assert checked >= len(picks) / 2, f"input {i}: {checked} of {len(picks)} nudges away from ties and ReLU cuts"


def test_one_openmp_runtime_pytorchs(fused):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    x = torch.randn(64, 1, 28, 28)
    kernels.conv_pool_relu(x, torch.nn.Conv2d(1, 5, 5))
    with open("/proc/self/maps") as f:
        runtimes = set(re.findall(r"\S*lib(?:gomp|iomp5|omp)[-.\w]*\.so\S*", f.read()))
    assert len(runtimes) <= 1, f"more than one OpenMP runtime loaded: {sorted(runtimes)}"


def test_status_names_the_build(fused):
    assert kernels.status().startswith("fused (fmnist._C, ")
    assert kernels.source_sha256()[:12] in kernels.status()


def built_extension(**changes):
    """A stand-in for fmnist._C as built from the current source for this torch, with ``changes``."""
    values = dict(SOURCE_SHA256=kernels.source_sha256(), TORCH_VERSION=torch.__version__.split("+")[0],
                  ISA="x86-64 avx2", __name__="fmnist._C")
    return lambda: types.SimpleNamespace(**{**values, **changes})


def test_a_binary_built_from_the_current_source_is_used(monkeypatch):
    monkeypatch.setattr(kernels, "_import_extension", built_extension())
    lib = kernels._load()
    assert lib.ok and lib.status == f"fused (fmnist._C, x86-64 avx2, source sha256 {kernels.source_sha256()[:12]}...)"


def test_a_binary_built_from_other_source_is_stale_and_refused_in_one_line(monkeypatch):
    # as if convpool.cpp had been edited since the build: the binary carries the old source's hash
    monkeypatch.setattr(kernels, "_import_extension", built_extension(SOURCE_SHA256="0" * 64))
    monkeypatch.setattr(kernels, "_state", None)
    assert not kernels.available() and kernels.status().startswith("stale (built from source sha256 000000000000")
    with pytest.raises(PipelineError) as err:
        build_model("network")
    message = str(err.value)
    assert "\n" not in message and "stale" in message and "run make" in message and "cpu_kernel: torch" in message


def test_a_binary_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "_import_extension", built_extension(TORCH_VERSION="2.0.0"))
    lib = kernels._load()
    assert not lib.ok and "built for torch 2.0.0" in lib.error and "\n" not in lib.error


def test_without_the_extension_building_the_fused_network_is_a_one_line_error(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'fmnist._C'", name="fmnist._C")

    monkeypatch.setattr(kernels, "_import_extension", missing)
    monkeypatch.setattr(kernels, "_state", None)
    assert not kernels.available() and kernels.status().startswith("not built")
    with pytest.raises(PipelineError) as err:
        build_model("network", cpu_kernel="fused")
    assert str(err.value) == (
        "the fused CPU kernel is not built (needs a C++ compiler: install g++ and run make, "
        "or pip install --no-build-isolation -e .); or set cpu_kernel: torch in params.yaml"
    )
    with pytest.raises(PipelineError, match="not built"):  # a Network made directly does not fall back either
        Network(cpu_kernel="fused")(torch.randn(2, 1, 28, 28))
    build_model("network", cpu_kernel="torch")(torch.randn(2, 1, 28, 28))  # what the message offers works
    build_model("fastnet", cpu_kernel="fused")(torch.randn(2, 1, 28, 28))  # fastnet ignores cpu_kernel


def test_an_extension_that_does_not_load_is_reported_not_hidden(monkeypatch):
    def broken():
        raise ImportError("_C.so: undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(kernels, "_import_extension", broken)
    lib = kernels._load()
    assert not lib.ok and "undefined symbol" in lib.status and "\n" not in lib.error


@pytest.mark.slow  # inductor compiles C++: about 20 s the first time, 5 s with its cache warm
def test_torch_compile_of_the_network_matches_eager(fused):
    # one whole graph (fullgraph): the operator traces through register_fake without a graph break
    model = build_model("network", seed=0)
    x = torch.randn(16, 1, 28, 28)
    graphs = []
    torch.compile(model, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)(x)
    op = torch.ops.fmnist.conv_pool_relu
    assert sum(node.target in (op, op.default) for node in graphs[0].graph.nodes) == 2  # not PyTorch's layers
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)  # bit-equal here; inductor may fuse
    x.requires_grad_(True)  # and the backward, through register_autograd
    (g_compiled,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (g_eager,) = torch.autograd.grad(model(x).square().sum(), x)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)


def test_make_rebuilds_the_kernel_when_its_source_changes():
    """The README's promise, asked of make itself (-n: plan only; -W: as if the C++ source were just edited)."""
    plan = subprocess.run(["make", "-n", "-W", "src/fmnist/csrc/convpool.cpp", ".venv/bin/dvc"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert "--reinstall-package fmnist" in plan and "-m fmnist.kernels" in plan
