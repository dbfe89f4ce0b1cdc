"""fmnist.export: the standalone program computes the checkpoint's logits, for any batch, in the same bytes anywhere."""

import copy

import pytest
import torch

from fmnist import export, kernels
from fmnist.errors import DataError
from fmnist.models import build_model

MEAN, STD = 0.286, 0.353


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["network", "fastnet"])
def test_the_program_gives_the_models_logits_for_any_batch_size(name):
    model = build_model(name, width=8, seed=1, cpu_kernel="torch").eval()
    program = export.export(model, MEAN, STD, images(2))
    reference = build_model(name, width=8, seed=1, cpu_kernel="fused" if kernels.available() else "torch").eval()
    assert export.check(program, reference, MEAN, STD, images(300, seed=2)) <= export.TOLERANCE
    for n in (1, 7):
        assert program.module()(images(n)).shape == (n, 10)


def test_a_program_that_differs_from_its_checkpoint_is_refused():
    model = build_model("network", width=8, seed=1, cpu_kernel="torch").eval()
    program = export.export(model, MEAN, STD, images(2))
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(DataError, match="differ from the checkpoint's"):
        export.check(program, other, MEAN, STD, images(50))


def test_the_file_depends_on_the_program_only(tmp_path):
    model = build_model("network", width=8, seed=1, cpu_kernel="torch").eval()
    first, second = tmp_path / "a" / "model.pt2", tmp_path / "elsewhere" / "other.pt2"
    second.parent.mkdir()
    first.parent.mkdir()
    export.save(export.export(model, MEAN, STD, images(2)), first)
    export.save(export.export(model, MEAN, STD, images(2)), second)
    assert first.read_bytes() == second.read_bytes()
    assert str(tmp_path).encode() not in first.read_bytes() and b"/src/fmnist/" not in first.read_bytes()
    loaded = torch.export.load(first).module()
    assert torch.equal(loaded(images(5)), export.Standalone(model, MEAN, STD)(images(5)))
