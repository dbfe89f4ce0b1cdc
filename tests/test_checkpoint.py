import os

import pytest
import torch

from fmnist import params
from fmnist.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from fmnist.engine import predict
from fmnist.errors import DataError
from fmnist.models import build_model

P = params.train_params({}, model="fastnet", width=8, seed=1)


def trained_like() -> torch.nn.Module:
    """A fastnet whose weights and BatchNorm statistics differ from what ``load_checkpoint`` builds before loading."""
    model = build_model(P.model, P.width, seed=P.seed).train()
    with torch.no_grad():
        model(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))  # moves the running statistics
    return model


def test_checkpoint_round_trip_restores_every_tensor_and_predicts_the_same(tmp_path):
    model = trained_like()
    save_checkpoint(tmp_path / "m.pt", model, P, 0.28, 0.35)
    loaded, info = load_checkpoint(tmp_path / "m.pt")
    assert info["model"] == "fastnet" and info["width"] == 8 and info["normalize"] == {"mean": 0.28, "std": 0.35}
    assert info["params"] == params.training_values(P) and not loaded.training
    expected = model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
    x = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(predict(loaded, x), predict(model, x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


def test_the_same_model_saves_to_the_same_bytes(tmp_path):
    model = trained_like()
    for name in ("a.pt", "b.pt"):
        save_checkpoint(tmp_path / name, model, P, 0.28, 0.35)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_corrupt_checkpoint_is_a_one_line_data_error(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="m.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "m.pt")
    with pytest.raises(DataError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: the code a tampered checkpoint could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    model = trained_like()
    payload = {  # a real checkpoint, plus one pickled object
        "format": FORMAT, "model": P.model, "width": P.width, "params": params.training_values(P),
        "normalize": {"mean": 0.28, "std": 0.35}, "state_dict": model.state_dict(), "note": RunsCode(marker),
    }
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(DataError) as e:
        load_checkpoint(tmp_path / "m.pt")
    assert str(e.value) == f"{tmp_path / 'm.pt'}: not a readable checkpoint (UnpicklingError)"
    assert not marker.exists()
    torch.load(tmp_path / "m.pt", weights_only=False)  # the file really does carry code: a plain load runs it
    assert marker.is_dir()


def test_the_recorded_training_parameters_come_back_with_defaults_for_keys_an_older_checkpoint_lacks(tmp_path):
    from fmnist.checkpoint import read_checkpoint, trained_params

    bf16 = params.train_params({}, model="fastnet", width=8, numerics="native", precision="bfloat16")
    save_checkpoint(tmp_path / "m.pt", trained_like(), bf16, 0.28, 0.35)
    assert trained_params(read_checkpoint(tmp_path / "m.pt")) == bf16
    older = {"params": {k: v for k, v in params.training_values(bf16).items() if k not in ("precision", "numerics")}}
    assert (trained_params(older).precision, trained_params(older).numerics) == ("auto", "portable")
    with pytest.raises(DataError, match="recorded parameters"):
        trained_params({"params": {**params.training_values(bf16), "precision": "float8"}})
