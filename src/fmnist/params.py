"""params.yaml, loaded into frozen, typed dataclasses that reject unknown keys and bad values.

Training keys sit at the top level (so ``dvc exp run -S lr=0.02`` works as written), the split under
``data:``, the sweep grid under ``sweep:``. Every error is a one-line :class:`ParamsError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import DuplicateKeyError

from .errors import ParamsError, first_line

SECTIONS = ("data", "sweep")
MODELS = ("network", "fastnet")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda")
CPU_KERNELS = ("fused", "torch")
NUMERICS = ("portable", "native")
PRECISIONS = ("auto", "float32", "bfloat16")


def _spec(default: Any, kind: type, allowed: str, check=lambda v: True) -> Any:
    """A dataclass field carrying its type, a predicate and the human description of what is allowed."""
    return field(default=default, metadata={"kind": kind, "allowed": allowed, "check": check})


def _one_of(default: str, choices: tuple[str, ...], note: str = "") -> Any:
    return _spec(default, str, f"one of {', '.join(choices)}{note}", lambda v: v in choices)


def _positive(v) -> bool:
    return v > 0


@dataclass(frozen=True)
class DataParams:
    """How the transform stage splits the 60,000 training images."""

    val_size: int = _spec(5000, int, "an integer from 1 to 59999", lambda v: 1 <= v <= 59_999)
    train_size: int | None = _spec(None, int, "null (all the rest) or a positive integer", lambda v: v is None or v > 0)
    split_seed: int = _spec(0, int, "a non-negative integer", lambda v: v >= 0)


@dataclass(frozen=True)
class TrainParams:
    """Training hyperparameters, the top level of params.yaml."""

    model: str = _one_of("network", MODELS)
    width: int = _spec(16, int, "a positive integer (channels of fastnet's first block)", _positive)
    lr: float = _spec(0.05, float, "a positive number", _positive)
    batch_size: int = _spec(100, int, "a positive integer", _positive)
    epochs: int = _spec(15, int, "a positive integer", _positive)
    optimizer: str = _one_of("sgd", OPTIMIZERS)
    momentum: float = _spec(0.9, float, "a number in [0, 1)", lambda v: 0 <= v < 1)
    weight_decay: float = _spec(0.001, float, "a non-negative number", lambda v: v >= 0)
    schedule: str = _one_of("onecycle", SCHEDULES)
    label_smoothing: float = _spec(0.0, float, "a number in [0, 1)", lambda v: 0 <= v < 1)
    flip: bool = _spec(False, bool, "true or false (random horizontal flips while training)")
    tta: bool = _spec(False, bool, "true or false (average predictions over flipped test images)")
    seed: int = _spec(0, int, "a non-negative integer", lambda v: v >= 0)
    device: str = _one_of("auto", DEVICES)
    cpu_kernel: str = _one_of("fused", CPU_KERNELS, " (the seed Network's conv layers on the CPU)")
    numerics: str = _one_of("portable", NUMERICS, " (CPU instruction set of PyTorch's kernels)")
    precision: str = _one_of("auto", PRECISIONS, " (auto: bfloat16 on CUDA, float32 on the CPU)")
    processes: int = _spec(
        1, int, "a positive integer (training processes, torch.distributed data-parallel)", _positive)


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainParams))
EVAL_ONLY_KEYS = ("tta",)  # read by evaluate, not by train: changing them must not retrain
# how a run computes, not what it trains: a sweep takes them from the top level for every run
RUNTIME_KEYS = ("device", "cpu_kernel", "numerics", "precision")
# a sweep run is one process: its parallelism is sweep_workers, runs side by side
UNSWEPT_KEYS = EVAL_ONLY_KEYS + RUNTIME_KEYS + ("processes",)
OTHER_KEYS = ("sweep_workers",)  # top-level keys that are not training hyperparameters


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """``value`` if it has field ``f``'s type and passes its check; an int counts as a float, a bool as neither."""
    if value is None and f.default is None:
        return None
    kind = f.metadata["kind"]
    number = kind is float and type(value) is int and abs(value) <= sys.float_info.max  # beyond it float() overflows
    checked = float(value) if number else value
    if type(checked) is not kind or (kind is float and not math.isfinite(checked)) or not f.metadata["check"](checked):
        raise ParamsError(f"params.yaml: {key} must be {f.metadata['allowed']}, got {value!r}")
    return checked


def _build(cls, values: Mapping[str, Any], prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    return cls(**{k: _coerce(prefix + k, v, fields[k]) for k, v in values.items()})


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml as DVC does (ruamel's safe loader, YAML 1.2) and reject top-level keys no stage knows."""
    path = Path(path)
    try:
        raw = YAML(typ="safe").load(path.read_text(encoding="utf-8"))  # DVC's parse_yaml, a key given twice included
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except DuplicateKeyError as e:  # its message is several lines and its first is not the key
        key = e.problem.partition(" with value")[0]  # the value may span lines
        raise ParamsError(f"{path}: not valid YAML ({key}, line {e.problem_mark.line + 1})") from None
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({first_line(e)})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values")
    known = TRAIN_KEYS + OTHER_KEYS + SECTIONS
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise ParamsError(f"params.yaml: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    return raw


def data_params(raw: Mapping[str, Any]) -> DataParams:
    section = raw.get("data") or {}
    if not isinstance(section, dict):
        raise ParamsError("params.yaml: data must be a mapping (val_size, train_size, split_seed)")
    return _build(DataParams, section, "data.")


def train_params(raw: Mapping[str, Any], **overrides: Any) -> TrainParams:
    """The top-level training keys, with ``overrides`` (one sweep run's values) applied on top."""
    return _build(TrainParams, {**{k: v for k, v in raw.items() if k in TRAIN_KEYS}, **overrides})


def training_values(p: TrainParams) -> dict[str, Any]:
    """``p`` as a dict without the evaluate-only keys: what a trained model depends on."""
    return {k: v for k, v in dataclasses.asdict(p).items() if k not in EVAL_ONLY_KEYS}


def sweep_runs(raw: Mapping[str, Any], runs: list) -> list[TrainParams]:
    """Each run's grid values over the defaults; from the top level only the runtime keys (a sweep is self-contained,
    so editing a top-level training key, ``dvc exp run -S lr=...``, neither changes nor reruns it)."""
    base = {k: raw[k] for k in RUNTIME_KEYS if k in raw}
    return [train_params(base, **run._asdict()) for run in runs]


def sweep_grid(raw: Mapping[str, Any]) -> dict[str, list]:
    """The ``sweep:`` section: training key -> list of values, every value validated up front."""
    section = raw.get("sweep")
    if not isinstance(section, dict) or not section:
        raise ParamsError("params.yaml: sweep must map training keys to lists of values, e.g. lr: [0.01, 0.001]")
    fields = {f.name: f for f in dataclasses.fields(TrainParams)}
    grid: dict[str, list] = {}
    for key, values in section.items():
        if key not in TRAIN_KEYS or key in UNSWEPT_KEYS:
            raise ParamsError(
                f"params.yaml: sweep.{key} is not a training key that can be swept "
                f"(allowed: {', '.join(k for k in TRAIN_KEYS if k not in UNSWEPT_KEYS)})"
            )
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ParamsError(f"params.yaml: sweep.{key} is an empty list; give at least one value")
        grid[key] = [_coerce(f"sweep.{key}", v, fields[key]) for v in values]
    return grid


def sweep_workers(raw: Mapping[str, Any]) -> int:
    """``sweep_workers``: sweep runs trained side by side, each in its own process; 0 = sized to the machine."""
    value = raw.get("sweep_workers", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParamsError(f"params.yaml: sweep_workers must be 0 (as many as the cores allow) or a positive "
                          f"integer, got {value!r}")
    return value
