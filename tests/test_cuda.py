"""The CUDA path: runs only where a GPU is present (CI and the development machine have none)."""

import io

import pytest
import torch

from fmnist import params
from fmnist.checkpoint import load_checkpoint, save_checkpoint
from fmnist.data import load_processed
from fmnist.engine import predict, to_device, train_run
from fmnist.tracking import RunManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_cuda_training_is_on_the_device_reproducible_and_loads_on_the_cpu(processed_small, tmp_path):
    data = load_processed(processed_small)
    dev = torch.device("cuda")
    tr, va, te = (to_device(s, data.mean, data.std, dev) for s in (data.train, data.val, data.test))
    p = params.train_params({}, model="fastnet", width=8, epochs=2, flip=True, device="cuda")
    (m1, r1), (m2, r2) = (train_run(p, tr, va, RunManager(stream=io.StringIO())) for _ in range(2))
    assert r1 == r2 and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert next(m1.parameters()).is_cuda
    save_checkpoint(tmp_path / "m.pt", m1, p, data.mean, data.std)
    cpu_model, _ = load_checkpoint(tmp_path / "m.pt", "cpu")
    gpu_logits = predict(m1, te.x, tta=True).cpu()
    cpu_logits = predict(cpu_model, te.x.cpu(), tta=True)
    assert (gpu_logits.argmax(1) == cpu_logits.argmax(1)).float().mean() > 0.95  # bf16 on the GPU
