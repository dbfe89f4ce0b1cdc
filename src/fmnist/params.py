"""params.yaml, loaded into frozen, typed dataclasses that reject unknown keys and bad values.

Training hyperparameters live at the top level of params.yaml (so that ``dvc exp run -S lr=0.02``
works as written); the data split lives under ``data:`` and the sweep grid under ``sweep:``.
Every error is a :class:`ParamsError` whose message names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ParamsError

SECTIONS = ("data", "sweep")


def _spec(default: Any, kind: type, allowed: str, check=lambda v: True) -> Any:
    """A dataclass field carrying its type, a predicate and the human description of what is allowed."""
    return field(default=default, metadata={"kind": kind, "allowed": allowed, "check": check})


def _positive(v) -> bool:
    return v > 0


@dataclass(frozen=True)
class DataParams:
    """How the transform stage splits the 60,000 training images."""

    val_size: int = _spec(5000, int, "an integer from 1 to 59999", lambda v: 1 <= v <= 59_999)
    train_size: int | None = _spec(
        None, int, "null (all the rest) or a positive integer", lambda v: v is None or v > 0
    )
    split_seed: int = _spec(0, int, "a non-negative integer", lambda v: v >= 0)


MODELS = ("network", "fastnet")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda")
CPU_KERNELS = ("fused", "torch")
NUMERICS = ("portable", "native")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class TrainParams:
    """Training hyperparameters, the top level of params.yaml."""

    model: str = _spec("network", str, f"one of {', '.join(MODELS)}", lambda v: v in MODELS)
    width: int = _spec(16, int, "a positive integer (channels of fastnet's first block)", _positive)
    lr: float = _spec(0.05, float, "a positive number", _positive)
    batch_size: int = _spec(100, int, "a positive integer", _positive)
    epochs: int = _spec(15, int, "a positive integer", _positive)
    optimizer: str = _spec("sgd", str, f"one of {', '.join(OPTIMIZERS)}", lambda v: v in OPTIMIZERS)
    momentum: float = _spec(0.9, float, "a number in [0, 1)", lambda v: 0 <= v < 1)
    weight_decay: float = _spec(0.001, float, "a non-negative number", lambda v: v >= 0)
    schedule: str = _spec("onecycle", str, f"one of {', '.join(SCHEDULES)}", lambda v: v in SCHEDULES)
    label_smoothing: float = _spec(0.0, float, "a number in [0, 1)", lambda v: 0 <= v < 1)
    flip: bool = _spec(False, bool, "true or false (random horizontal flips while training)")
    tta: bool = _spec(False, bool, "true or false (average predictions over flipped test images)")
    seed: int = _spec(0, int, "a non-negative integer", lambda v: v >= 0)
    device: str = _spec("auto", str, f"one of {', '.join(DEVICES)}", lambda v: v in DEVICES)
    cpu_kernel: str = _spec(
        "fused", str, f"one of {', '.join(CPU_KERNELS)} (the seed Network's conv layers on the CPU)",
        lambda v: v in CPU_KERNELS,
    )
    numerics: str = _spec(
        "portable", str, f"one of {', '.join(NUMERICS)} (CPU instruction set of PyTorch's kernels)",
        lambda v: v in NUMERICS,
    )
    precision: str = _spec(
        "auto", str, f"one of {', '.join(PRECISIONS)} (auto: bfloat16 on CUDA, float32 on the CPU)",
        lambda v: v in PRECISIONS,
    )
    processes: int = _spec(
        1, int, "a positive integer (training processes, torch.distributed data-parallel)", _positive,
    )


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainParams))
EVAL_ONLY_KEYS = ("tta",)  # read by evaluate, not by train: changing them must not retrain
# how a run computes, not what it trains: a sweep takes them from the top level for every run
RUNTIME_KEYS = ("device", "cpu_kernel", "numerics", "precision")
# a sweep run is one process: its parallelism is sweep_workers, runs side by side
UNSWEPT_KEYS = EVAL_ONLY_KEYS + RUNTIME_KEYS + ("processes",)
# top-level keys that are not training hyperparameters
OTHER_KEYS = ("sweep_workers",)


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    kind, allowed = f.metadata["kind"], f.metadata["allowed"]
    bad = ParamsError(f"params.yaml: {key} must be {allowed}, got {value!r}")
    if value is None:
        if f.default is None:
            return None
        raise bad
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise bad
    if not f.metadata["check"](value):
        raise bad
    return value


def _build(cls, values: Mapping[str, Any], prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key '{prefix}{unknown[0]}' (known: {', '.join(fields)})"
        )
    return cls(**{k: _coerce(prefix + k, v, fields[k]) for k, v in values.items()})


_CORE = "tag:yaml.org,2002:"
# ruamel.yaml's YAML 1.2 patterns for plain scalars (ruamel/yaml/resolver.py, the (1, 2) entries, in its order):
# (tag, pattern, the first characters it can start with)
_YAML12_SCALARS = (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("float", r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", "-+0123456789."),
    ("int", r"""^(?:[-+]?0b[0-1_]+
                 |[-+]?0o?[0-7_]+
                 |[-+]?[0-9_]+
                 |[-+]?0x[0-9a-fA-F_]+)$""", "-+0123456789"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
)


def _yaml12_resolvers() -> dict:
    """SafeLoader's implicit resolvers with YAML 1.1's bool, int, float and null patterns replaced by 1.2's."""
    replaced = {_CORE + tag for tag, _, _ in _YAML12_SCALARS}
    table = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in replaced]  # keeps timestamps, merge keys, ...
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag, pattern, firsts in _YAML12_SCALARS:
        for first in firsts:
            table.setdefault(first, []).append((_CORE + tag, re.compile(pattern, re.X)))
    return table


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """An int as YAML 1.2 writes it: ``0b``, ``0o`` and ``0x`` prefixes; a leading ``0`` alone is decimal."""
    text = loader.construct_scalar(node)
    value = text.replace("_", "")
    sign = -1 if value[:1] == "-" else 1
    digits = value.lstrip("+-")
    base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2], 10)
    try:
        return sign * int(digits[2:] if base != 10 else digits, base)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"not an integer: {text!r}", node.start_mark) from None


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading plain scalars as YAML 1.2, the way DVC (ruamel.yaml) reads params.yaml.

    PyYAML implements YAML 1.1, where ``1e-3`` is a string, ``yes``/``on`` are booleans, ``017``
    is octal and ``1:20`` is sexagesimal 80; DVC reads the same file as 1.2 (``0.001``, ``'yes'``,
    ``17``, ``'1:20'``). The patterns are ruamel.yaml's, which unlike the strict 1.2 core schema
    also allow ``_`` between digits; a key given twice is an error, as in DVC.
    """

    yaml_implicit_resolvers = _yaml12_resolvers()
    yaml_constructors = {**yaml.SafeLoader.yaml_constructors, _CORE + "int": _construct_int}

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _CORE + "merge":
                    if (key.tag, key.value) in seen:
                        line = key.start_mark.line + 1
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key.value!r} given twice (line {line})", key.start_mark
                        )
                    seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml as DVC reads it (YAML 1.2) and reject top-level keys that no stage knows."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=Yaml12Loader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values")
    unknown = sorted(set(raw) - set(TRAIN_KEYS) - set(OTHER_KEYS) - set(SECTIONS), key=str)
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key {unknown[0]!r} "
            f"(known: {', '.join(TRAIN_KEYS + OTHER_KEYS + SECTIONS)})"
        )
    return raw


def data_params(raw: Mapping[str, Any]) -> DataParams:
    section = raw.get("data") or {}
    if not isinstance(section, dict):
        raise ParamsError("params.yaml: data must be a mapping (val_size, train_size, split_seed)")
    return _build(DataParams, section, "data.")


def train_params(raw: Mapping[str, Any], **overrides: Any) -> TrainParams:
    """The top-level training keys, with ``overrides`` (one sweep run's values) applied on top."""
    values = {k: v for k, v in raw.items() if k in TRAIN_KEYS}
    values.update(overrides)
    return _build(TrainParams, values)


def training_values(p: TrainParams) -> dict[str, Any]:
    """``p`` as a dict without the evaluate-only keys: what a trained model depends on."""
    return {k: v for k, v in dataclasses.asdict(p).items() if k not in EVAL_ONLY_KEYS}


def sweep_runs(raw: Mapping[str, Any], runs: list) -> list[TrainParams]:
    """The training parameters of each sweep run: its grid values over the built-in defaults.

    A sweep is self-contained: only the runtime keys (``device``, ``cpu_kernel``, ``numerics``, ``precision``)
    come from the top level, so editing a top-level training key (``dvc exp run -S lr=...``) neither changes
    nor reruns the sweep.
    """
    base = {k: raw[k] for k in RUNTIME_KEYS if k in raw}
    return [train_params(base, **run._asdict()) for run in runs]


def sweep_grid(raw: Mapping[str, Any]) -> dict[str, list]:
    """The ``sweep:`` section: training key -> list of values, every value validated up front."""
    section = raw.get("sweep")
    if not isinstance(section, dict) or not section:
        raise ParamsError("params.yaml: sweep must map training keys to lists of values, e.g. lr: [0.01, 0.001]")
    grid: dict[str, list] = {}
    for key, values in section.items():
        if key not in TRAIN_KEYS or key in UNSWEPT_KEYS:
            raise ParamsError(
                f"params.yaml: sweep.{key} is not a training key that can be swept "
                f"(allowed: {', '.join(k for k in TRAIN_KEYS if k not in UNSWEPT_KEYS)})"
            )
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise ParamsError(f"params.yaml: sweep.{key} is an empty list; give at least one value")
        fld = next(f for f in dataclasses.fields(TrainParams) if f.name == key)
        grid[key] = [_coerce(f"sweep.{key}", v, fld) for v in values]
    return grid


def sweep_workers(raw: Mapping[str, Any]) -> int:
    """``sweep_workers``: sweep runs trained side by side, each in its own process; 0 = sized to the machine."""
    value = raw.get("sweep_workers", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParamsError(f"params.yaml: sweep_workers must be 0 (as many as the cores allow) or a positive "
                          f"integer, got {value!r}")
    return value
