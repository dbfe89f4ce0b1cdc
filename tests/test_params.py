import dataclasses
import re
import subprocess
import sys

import pytest
import torch
import yaml

from fmnist import models, params, runtime
from fmnist.errors import ParamsError

from .conftest import ROOT, outputs


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
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto").type == "cpu"


def test_model_names_agree_between_params_and_models():
    assert set(params.MODELS) == set(models.MODELS)


def stage(name):
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]


def test_every_key_a_stage_reads_is_declared_in_dvc_yaml():
    train_keys = set(params.TRAIN_KEYS) - set(params.EVAL_ONLY_KEYS)
    assert set(stage("train")["params"]) == train_keys
    assert set(stage("evaluate")["params"]) == {"tta", *params.RUNTIME_KEYS}
    assert stage("transform")["params"] == ["data"]
    assert set(stage("sweep")["params"]) == {"sweep", "sweep_workers", *params.RUNTIME_KEYS}


@pytest.mark.parametrize("stage, text, message", [
    ("train", "lr: -1\n", "lr must be a positive number, got -1"),
    ("transform", "data:\n  val_size: -5\n", "data.val_size must be"),
    ("evaluate", "tta: maybe\n", "tta must be"),
    ("sweep", "sweep:\n  lr: [0.1, -1]\n", "sweep.lr"),
])
def test_each_stage_rejects_bad_params_in_one_line_before_any_work(tmp_path, stage, text, message):
    bad = write(tmp_path, text)
    args = {"train": ["--data", tmp_path / "none", *outputs("train", tmp_path)],
            "transform": ["--raw", tmp_path / "none", "--out", tmp_path / "processed"],
            "evaluate": ["--data", tmp_path / "none", "--model", tmp_path / "none.pt", *outputs("evaluate", tmp_path)],
            "sweep": ["--data", tmp_path / "none", *outputs("sweep", tmp_path)]}[stage]
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--params", str(bad), *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: ") and message in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# -- params.yaml read as DVC reads it (YAML 1.2, ruamel.yaml) ----------------------------------

def dvc_reads(path):
    """``path`` as DVC's params dependency reads it (``dvc params diff``, ``dvc exp show``, stage params)."""
    from dvc.dependency.param import read_param_file
    from dvc.fs import LocalFileSystem

    return read_param_file(LocalFileSystem(), str(path))


# what a person writes by hand, what `dvc exp run -S` writes, and YAML 1.1-only forms that 1.2 reads otherwise
SCALARS = [
    "0.05", "1e-3", "5e-4", "1e-05", "1.0e+2", "1E3", "1e+16", "1.5E-3", ".5", "+.5", "-.5", "+1.5", "1.", "-0.0",
    ".5e-3", ".5e3", "1.e3", "0e0", ".inf", "-.Inf", "+.INF", ".nan", ".NaN", "-.nan", "1_000.5",
    "0", "-0", "+12", "100", "017", "08", "0o17", "-0o17", "0x1F", "0X1F", "0b101", "1_000", "1:20", "1:20.5",
    "true", "True", "TRUE", "false", "False", "tRue", "yes", "no", "on", "off", "y", "n", "Yes", "ON",
    "null", "Null", "NULL", "~", "", "nul", "network", "'1e-3'", '"017"', "2024-01-01", "[1e-3, 5e-4, 017, yes]",
]


@pytest.mark.parametrize("text", SCALARS)
def test_values_load_with_the_value_and_type_dvc_gives_them(tmp_path, text):
    path = write(tmp_path, f"lr: {text}\n")
    ours, dvcs = params.load(path)["lr"], dvc_reads(path)["lr"]
    assert (repr(ours), type(ours)) == (repr(dvcs), type(dvcs))  # repr: nan == nan, and 1 != True


@pytest.mark.parametrize(
    "text, key, value",
    [("lr: 1e-3", "lr", 1e-3), ("weight_decay: 5e-4", "weight_decay", 5e-4), ("lr: 1.0e+2", "lr", 100.0),
     ("lr: 1E3", "lr", 1000.0), ("lr: .5", "lr", 0.5), ("lr: +1.5", "lr", 1.5), ("lr: 1e-05", "lr", 1e-5),
     ("momentum: 9e-1", "momentum", 0.9), ("label_smoothing: 1e-1", "label_smoothing", 0.1)],
)
def test_exponent_floats_are_accepted_as_floats(tmp_path, text, key, value):
    p = params.train_params(params.load(write(tmp_path, text + "\n")))
    assert getattr(p, key) == value and isinstance(getattr(p, key), float)


def test_sweep_lists_read_exponent_floats_as_floats(tmp_path):
    grid = params.sweep_grid(params.load(write(tmp_path, "sweep: {lr: [1e-3, 5e-4], batch_size: [1_000]}\n")))
    assert grid == {"lr": [1e-3, 5e-4], "batch_size": [1000]}


def test_yaml_1_1_booleans_are_strings_as_in_dvc(tmp_path):
    with pytest.raises(ParamsError, match=r"params.yaml: flip must be true or false .*, got 'yes'$"):
        params.train_params(params.load(write(tmp_path, "flip: yes\n")))


@pytest.mark.parametrize("second", ["0.2", "|\n  two\n  lines"])  # a value that spans lines
def test_a_key_given_twice_is_refused_in_one_line_as_dvc_refuses_it(tmp_path, second):
    path = write(tmp_path, f"lr: 0.1\nbatch_size: 10\nlr: {second}\n")
    with pytest.raises(ParamsError) as e:
        params.load(path)
    assert str(e.value) == f'{path}: not valid YAML (found duplicate key "lr", line 3)'
    from dvc.utils.serialize import YAMLFileCorruptedError

    with pytest.raises(YAMLFileCorruptedError):
        dvc_reads(path)


@pytest.mark.parametrize(
    "override, key, value",
    [("lr=1e-3", "lr", 1e-3), ("lr=1e-5", "lr", 1e-5), ("weight_decay=5e-4", "weight_decay", 5e-4),
     ("lr=1e16", "lr", 1e16), ("lr=2", "lr", 2.0), ("batch_size=256", "batch_size", 256), ("flip=true", "flip", True),
     ("model=fastnet", "model", "fastnet"), ("data.train_size=1_000", "train_size", 1000),
     ("data.train_size=null", "train_size", None)],
)
def test_values_written_by_dvc_exp_run_set_param_read_back(tmp_path, override, key, value):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls to edit params.yaml

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(path, [override])
    raw = params.load(path)
    assert raw == dvc_reads(path)
    p = params.data_params(raw) if override.startswith("data.") else params.train_params(raw)
    assert getattr(p, key) == value and type(getattr(p, key)) is type(value)


# -- every bounded key at its edges: each boundary accepted, just past it refused ---------------

TINY = 5e-324  # the smallest positive float
BELOW_ONE = 1 - 2**-53  # the largest float below 1
EDGES = {  # field -> (values accepted, values refused); every field of both dataclasses must be here
    params.DataParams: {
        "val_size": ([1, 59_999], [0, 60_000, -1, 100.0]),
        "train_size": ([None, 1], [0, -1, 1.0]),
        "split_seed": ([0, 2**40], [-1, 0.0]),
    },
    params.TrainParams: {
        "model": (["network", "fastnet"], ["resnet", "Network", None]),
        "width": ([1], [0, -1, 8.0]),
        "lr": ([TINY, 1, 1e3], [0, 0.0, -TINY, float("inf"), float("nan"), True, "0.1", 10**400]),
        "batch_size": ([1], [0, -1, 1.0, True]),
        "epochs": ([1], [0, -1, 1.0]),
        "optimizer": (["sgd", "adam"], ["SGD", "rmsprop"]),
        "momentum": ([0, 0.0, BELOW_ONE], [1, 1.0, -TINY, float("nan")]),
        "weight_decay": ([0, 0.0, TINY, 1], [-TINY, -1, float("inf")]),
        "schedule": (["onecycle", "constant"], ["one_cycle", "cosine"]),
        "label_smoothing": ([0, 0.0, BELOW_ONE], [1, 1.0, -TINY]),
        "flip": ([True, False], [1, 0, "true", None]),
        "tta": ([True, False], [1, 0, "yes", None]),
        "seed": ([0, 2**40], [-1, 0.5]),
        "device": (["auto", "cpu", "cuda"], ["gpu", "CPU"]),
        "cpu_kernel": (["fused", "torch"], ["c", "Torch"]),
        "numerics": (["portable", "native"], ["fast", "avx2"]),
        "precision": (["auto", "float32", "bfloat16"], ["bf16", "fp32", "half", None]),
        "processes": ([1, 2, 64], [0, -1, 1.5, True, "2"]),
    },
}
FIELDS = [(cls, f.name) for cls in EDGES for f in dataclasses.fields(cls)]


def build(cls, key, value):
    if cls is params.DataParams:
        return params.data_params({"data": {key: value}})
    return params.train_params({key: value})


def test_the_edge_table_covers_exactly_the_dataclass_fields():
    for cls, table in EDGES.items():
        assert set(table) == {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__}: add the new key's edges"


@pytest.mark.parametrize("cls, key", FIELDS, ids=[k for _, k in FIELDS])
def test_each_boundary_is_accepted_and_just_past_it_refused(cls, key):
    accepted, refused = EDGES[cls].get(key, ([], []))
    assert accepted and refused, f"{key} has no edge values in EDGES"
    kind = next(f for f in dataclasses.fields(cls) if f.name == key).metadata["kind"]
    for value in accepted:
        got = getattr(build(cls, key, value), key)
        assert got == value and type(got) is (type(None) if value is None else float if kind is float else type(value))
    prefix = "data." if cls is params.DataParams else ""
    for value in refused:
        message = rf"^params.yaml: {prefix}{key} must be .*, got {re.escape(repr(value))}$"
        with pytest.raises(ParamsError, match=message):
            build(cls, key, value)


def test_every_choice_the_dataclass_allows_is_in_the_edge_table():
    choices = {"model": params.MODELS, "optimizer": params.OPTIMIZERS, "schedule": params.SCHEDULES,
               "device": params.DEVICES, "cpu_kernel": params.CPU_KERNELS, "numerics": params.NUMERICS,
               "precision": params.PRECISIONS}
    for key, allowed in choices.items():
        assert set(EDGES[params.TrainParams][key][0]) == set(allowed), key


def test_sweep_workers_is_zero_for_auto_or_a_positive_count():
    assert params.sweep_workers({}) == 0 and params.sweep_workers({"sweep_workers": 3}) == 3
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ParamsError, match="sweep_workers must be 0"):
            params.sweep_workers({"sweep_workers": bad})


def test_the_built_in_defaults_are_the_values_params_yaml_ships_with_and_each_key_says_what_it_takes():
    """A sweep's unlisted keys take the built-in defaults, which the README calls the values params.yaml ships."""
    raw = params.load(ROOT / "params.yaml")
    assert params.train_params(raw) == params.TrainParams()
    lines = (ROOT / "params.yaml").read_text().splitlines()
    for key in (*params.TRAIN_KEYS, *params.OTHER_KEYS):
        line = next(line for line in lines if line.startswith(f"{key}:"))
        assert "#" in line, f"params.yaml: {key} has no comment"
