import subprocess
import sys

import pytest
import torch
import yaml

from fmnist import engine, models, params
from fmnist.errors import ParamsError

from .conftest import ROOT


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_yaml_is_valid():
    raw = params.load(ROOT / "params.yaml")
    params.data_params(raw), params.train_params(raw), params.sweep_grid(raw)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lrr: 0.1\n", "params.yaml: unknown key 'lrr'"),
        ("lr: -0.1\n", "params.yaml: lr must be a positive number, got -0.1"),
        ("lr: .nan\n", "params.yaml: lr must be a positive number, got nan"),
        ("batch_size: 0\n", "params.yaml: batch_size must be a positive integer, got 0"),
        ("batch_size: 1.5\n", "params.yaml: batch_size must be a positive integer, got 1.5"),
        ("epochs: true\n", "params.yaml: epochs must be a positive integer, got True"),
        ("optimizer: rmsprop\n", "params.yaml: optimizer must be one of adam, sgd, got 'rmsprop'"),
        ("device: tpu\n", "params.yaml: device must be one of auto, cpu, cuda, got 'tpu'"),
        ("model: resnet\n", "params.yaml: model must be one of network, fastnet, got 'resnet'"),
        ("flip: 1\n", "params.yaml: flip must be true or false"),
    ],
)
def test_bad_training_values_name_the_key_and_what_is_allowed(tmp_path, text, message):
    with pytest.raises(ParamsError) as e:
        params.train_params(params.load(write(tmp_path, text)))
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: {val_size: 0}\n", "params.yaml: data.val_size must be an integer from 1 to 59999"),
        ("data: {valsize: 10}\n", "params.yaml: unknown key 'data.valsize'"),
        ("data: {train_size: -5}\n", "params.yaml: data.train_size must be null"),
    ],
)
def test_bad_data_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError) as e:
        params.data_params(params.load(write(tmp_path, text)))
    assert str(e.value).startswith(message)


def test_defaults_fill_missing_keys_and_ints_are_accepted_as_floats(tmp_path):
    p = params.train_params(params.load(write(tmp_path, "lr: 1\n")))
    assert p.lr == 1.0 and isinstance(p.lr, float) and p.batch_size == params.TrainParams().batch_size


def test_unreadable_yaml_is_one_line(tmp_path):
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.load(write(tmp_path, "lr: [0.1\n"))


def test_cuda_without_a_gpu_is_a_params_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="device is 'cuda' but no CUDA GPU is available"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto").type == "cpu"


def test_model_names_agree_between_params_and_models():
    assert set(params.MODELS) == set(models.MODELS)


def stage(name):
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]


def test_every_key_a_stage_reads_is_declared_in_dvc_yaml():
    train_keys = set(params.TRAIN_KEYS) - set(params.EVAL_ONLY_KEYS)
    assert set(stage("train")["params"]) == train_keys
    assert set(stage("evaluate")["params"]) == {"tta", *params.RUNTIME_KEYS}
    assert stage("transform")["params"] == ["data"]
    assert set(stage("sweep")["params"]) == {"sweep", *params.RUNTIME_KEYS}


def test_train_stage_rejects_bad_params_before_any_work(tmp_path):
    bad = write(tmp_path, "lr: -1\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), "--params", str(bad), "--data", str(tmp_path / "none"),
         "--model", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "t.json"),
         "--history", str(tmp_path / "h.csv"), "--logdir", str(tmp_path / "runs")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: params.yaml: lr must be a positive number, got -1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
