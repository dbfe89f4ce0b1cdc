"""``fmnist doctor``: the tutorial's installation check, and whether this repository can run its pipeline.

Every check gives one line, a state and, where something is to be done, the next step:

- ``ok``: present and working;
- ``info``: worth knowing, nothing to do (no GPU, say);
- ``todo``: missing but made by the pipeline or optional (data, a trained model, a DVC remote);
- ``FAIL``: the default pipeline (``dvc repro`` with this params.yaml) cannot run: params.yaml
  invalid, a package that does not import, a kernel params.yaml asks for and that is not built.

Only ``FAIL`` makes the exit status non-zero. Nothing is written, nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ParamsError, PipelineError

OK, INFO, TODO, FAIL = "ok", "info", "todo", "FAIL"
FILL_REMOTE = "`dvc remote add -d storage s3://BUCKET/fmnist` (or a shared folder), then `dvc push`; see the README"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``state`` one of ok, info, todo, FAIL; ``next`` what to do, if anything."""

    name: str
    state: str
    detail: str
    next: str = ""


def _guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """Run ``check``; an exception it did not expect becomes one FAIL line, not a traceback."""
    try:
        return check()
    except PipelineError as e:
        return [Check(name, FAIL, str(e))]
    except Exception as e:  # noqa: BLE001 (doctor reports what is broken, whatever it is)
        why = str(e).splitlines()[0] if str(e) else ""
        return [Check(name, FAIL, f"{type(e).__name__}: {why}".rstrip(": "))]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pins() -> dict[str, str]:
    """The exact versions fmnist's metadata pins (``torch==2.14.1``): package -> version."""
    pins = {}
    for req in importlib.metadata.requires("fmnist") or []:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)\s*$", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _imports(module: str, dist: str, label: str, needed_for: str) -> list[Check]:
    """A package that must import: its version, and whether it matches fmnist's pin."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (ImportError, or e.g. a torchvision built for another torch)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [Check(label, FAIL, f"{label} does not import ({why}); {needed_for} needs it",
                      "make (builds .venv from uv.lock), then source .venv/bin/activate")]
    version = str(getattr(mod, "__version__", None) or _version(dist))
    pin = _pins().get(dist)
    if pin and version.split("+")[0] != pin:
        return [Check(label, TODO, f"{label} {version}, but fmnist pins {pin}: results will not match the "
                                   "committed ones bit for bit", "make (installs the versions locked in uv.lock)")]
    return [Check(label, OK, f"{label} {version}")]


# Environment


def check_python() -> list[Check]:
    return [Check("Python", OK, f"Python {platform.python_version()} ({sys.executable})")]


def check_torch() -> list[Check]:
    checks = _imports("torch", "torch", "torch", "every stage")
    if checks[0].state == FAIL:
        return checks
    import torch

    x = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    got = (x @ x).sum().item()  # [[0,1],[2,3]]^2 = [[2,3],[6,11]]
    if got != 22.0:
        return checks + [Check("torch", FAIL, f"a 2x2 matrix product on the CPU gave {got}, not 22",
                               "rebuild the environment: rm -rf .venv && make")]
    return [Check(c.name, c.state, c.detail + ("; a tensor operation runs" if c.state == OK else ""), c.next)
            for c in checks]


def check_cpu() -> list[Check]:
    import torch

    from . import runtime

    isa = " ".join(runtime.cpu_isa()) or "none of AVX2, AVX-512, NEON"
    cores, threads = runtime.available_cores(), torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS")
    limit = f", OMP_NUM_THREADS={omp}" if omp else ""
    return [
        Check("CPU", OK, f"CPU {runtime.cpu_model()} ({platform.machine()}; {isa}; PyTorch's own choice of "
                         f"kernels: {torch.backends.cpu.get_cpu_capability()}, numerics: portable pins AVX2)"),
        Check("threads", OK, f"threads: torch uses {threads}; {cores} core(s) available to this process "
                             f"({os.cpu_count()} on the machine{limit}); a training takes every available core, "
                             "or its share when several run"),
    ]


def _cudnn_version(v: int) -> str:
    """cuDNN's version number as major.minor.patch: 92400 -> 9.24.0 (cuDNN 9), 8907 -> 8.9.7 (cuDNN 8)."""
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 90000 else f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def check_cuda() -> list[Check]:
    import torch

    built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "torch built without CUDA"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    libs = f"{built}, cuDNN {_cudnn_version(cudnn)}" if cudnn else built
    if not torch.cuda.is_available():
        return [Check("CUDA", INFO, f"CUDA: no GPU available ({libs}); device: auto trains on the CPU")]
    checks = [Check("CUDA", OK, f"CUDA: {torch.cuda.device_count()} GPU(s) ({libs})")]
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        checks.append(Check("GPU", OK, f"GPU {i}: {props.name}, compute capability {props.major}.{props.minor}, "
                                       f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"))
    x = torch.ones(2, 2, device="cuda")
    if (x @ x).sum().item() != 8.0:
        checks.append(Check("CUDA", FAIL, "a 2x2 matrix product on the GPU gave a wrong result",
                            "check the NVIDIA driver; meanwhile set device: cpu in params.yaml"))
    return checks


def check_kernel() -> list[Check]:
    from . import kernels

    state = OK if kernels.available() else INFO  # whether it is needed is the params.yaml check's call
    return [Check("fused CPU kernel", state, f"fused CPU kernel: {kernels.status()}")]


def environment_checks() -> list[Check]:
    checks = _guarded("Python", check_python) + _guarded("torch", check_torch)
    torch_ok = checks[-1].state != FAIL
    checks += _guarded("torchvision", lambda: _imports("torchvision", "torchvision", "torchvision",
                                                       "train (image grids in its TensorBoard log)"))
    checks += _guarded("DVC", check_dvc)
    checks += _guarded("TensorBoard", lambda: _imports("tensorboard", "tensorboard", "TensorBoard",
                                                       "train (its logs)"))
    checks += _guarded("Pillow", lambda: _imports("PIL", "pillow", "Pillow", "fmnist predict"))
    if torch_ok:
        for name, check in (("CPU", check_cpu), ("CUDA", check_cuda), ("fused CPU kernel", check_kernel)):
            checks += _guarded(name, check)
    return checks


def check_dvc() -> list[Check]:
    checks = _imports("dvc", "dvc", "DVC", "every pipeline command")
    if checks[0].state == OK and shutil.which("dvc") is None:
        checks.append(Check("DVC", TODO, "the dvc command is not on PATH", "source .venv/bin/activate"))
    return checks


# Repository


def check_params(repo: Path, torch_ok: bool) -> tuple[list[Check], object | None, dict | None]:
    """(checks, the training parameters, the raw params.yaml) or, when it is invalid, (FAIL, None, None)."""
    from . import params

    try:
        raw = params.load(repo / "params.yaml")
        p = params.train_params(raw)
        d = params.data_params(raw)
        grid = params.sweep_grid(raw)
        if torch_ok:  # fmnist.tracking imports torch
            from .tracking import RunBuilder

            params.sweep_runs(raw, RunBuilder.get_runs(grid))  # every run, as the sweep stage checks them
    except PipelineError as e:
        fix = "fix params.yaml (its comments say what each key takes)"
        return [Check("params.yaml", FAIL, str(e), fix)], None, None
    detail = (f"params.yaml: valid (model {p.model}, {p.epochs} epochs, device {p.device}, cpu_kernel {p.cpu_kernel}, "
              f"numerics {p.numerics}; data.val_size {d.val_size})")
    return [Check("params.yaml", OK, detail)], p, raw


def check_runtime(p, raw: dict, torch_ok: bool) -> list[Check]:
    """What params.yaml asks of this machine: a GPU for ``device: cuda``, AVX2 for portable numerics, the kernel,
    and for bfloat16 on the CPU native numerics (the stages refuse it otherwise) and, for its speed, AVX512_BF16 or AMX.
    """
    from . import runtime

    checks = []
    if p.numerics == "portable" and (platform.machine().lower() not in ("x86_64", "amd64")
                                     or "AVX2" not in runtime.cpu_isa()):
        checks.append(Check("numerics", FAIL, f"params.yaml asks numerics: portable (x86-64 AVX2 kernels) and this "
                                              f"CPU ({platform.machine()}) cannot run them",
                            "set numerics: native in params.yaml"))
    if not torch_ok:
        return checks
    import torch

    if p.device == "cuda" and not torch.cuda.is_available():
        checks.append(Check("device", FAIL, "params.yaml asks device: cuda and no CUDA GPU is available",
                            "set device: auto or cpu in params.yaml"))
    on_cpu = p.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and p.precision == "bfloat16":
        try:
            runtime.check_precision(p, torch.device("cpu"))  # the stages' own refusal, asked rather than restated
        except ParamsError:
            checks.append(Check("precision", FAIL, "params.yaml asks precision: bfloat16 on the CPU with numerics: "
                                                   "portable, which has no bfloat16 kernels (the stages refuse it)",
                                "set numerics: native, or precision: auto, in params.yaml"))
        else:
            if not {"AVX512_BF16", "AMX"} & set(runtime.cpu_isa()):
                checks.append(Check("precision", INFO, "params.yaml asks precision: bfloat16 and this CPU has neither "
                                                       "AVX512_BF16 nor AMX: bfloat16 runs without native "
                                                       "instructions, so the README's bfloat16 speed-up does not apply",
                                    "compare with precision: auto (float32 on the CPU)"))
    from .params import sweep_grid

    models = {p.model, *sweep_grid(raw).get("model", ["network"])}  # a sweep run not given a model trains the Network
    if on_cpu and p.cpu_kernel == "fused" and "network" in models:
        from . import kernels

        try:
            kernels.require()
            checks.append(Check("cpu_kernel", OK, "params.yaml asks cpu_kernel: fused, and the kernel is usable"))
        except PipelineError as e:
            why = str(e).split("; or set")[0]  # the next step below says the alternative
            checks.append(Check("cpu_kernel", FAIL, f"params.yaml asks cpu_kernel: fused and {why}",
                                "run make (needs g++), or set cpu_kernel: torch in params.yaml"))
    return checks


def check_dvc_repo(repo: Path) -> tuple[list[Check], list[str]]:
    """(checks, names of the configured remotes): the .dvc folder, git beside it, the remotes."""
    if not (repo / ".dvc").is_dir():
        return [Check("DVC", FAIL, f"{repo}: not a DVC repository (no .dvc folder)", "dvc init")], []
    checks = []
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(repo / ".dvc"))
    except ConfigError as e:
        return [Check("DVC config", FAIL, f"DVC's configuration is invalid ({str(e).splitlines()[0]})",
                      "dvc config --list shows it; fix .dvc/config")], []
    if not config["core"].get("no_scm") and not any((d / ".git").exists() for d in (repo, *repo.parents)):
        checks.append(Check("git", FAIL, f"{repo} is not in a git repository, which DVC needs",
                            "git init (or dvc config core.no_scm true)"))
    remotes = dict(config["remote"])
    if not remotes:
        checks.append(Check("DVC remote", TODO, "DVC remote: none (data and models are only on this machine)",
                            FILL_REMOTE))
        return checks, []
    default = config["core"].get("remote")
    for name, conf in sorted(remotes.items()):
        url = conf.get("url", "?")
        mark = " (default)" if name == default else ""
        checks.append(Check("DVC remote", OK, f"DVC remote {name}{mark}: {url}"))
        scheme = url.split("://", 1)[0] if "://" in url else ""
        plugin = {"s3": "dvc_s3", "gs": "dvc_gs", "azure": "dvc_azure", "ssh": "dvc_ssh"}.get(scheme)
        if plugin and importlib.util.find_spec(plugin) is None:
            extra = " (pip install -e '.[s3]')" if scheme == "s3" else ""
            checks.append(Check("DVC remote", TODO, f"DVC remote {name} needs the {plugin.replace('_', '-')} "
                                                    "package, which is not installed",
                                f"pip install {plugin.replace('_', '-')}{extra}"))
    if default is None:
        checks.append(Check("DVC remote", TODO, "no default remote: dvc push and dvc pull need -r NAME",
                            f"dvc remote default {sorted(remotes)[0]}"))
    return checks, sorted(remotes)


def _fetch(remotes: list[str]) -> str:
    return "run `dvc pull`, or `dvc repro` to make it" if remotes else "run `dvc repro`"


def check_data(repo: Path, d_params, remotes: list[str]) -> list[Check]:
    from .extract import FILES, MIRROR_ENV

    checks = []
    raw = repo / "data" / "raw"
    missing = [f for f in FILES if not (raw / f).is_file()]
    if not missing:
        checks.append(Check("data/raw", OK, f"data/raw: the {len(FILES)} Fashion-MNIST files"))
    else:
        what = "missing" if len(missing) == len(FILES) else f"{', '.join(missing)} missing"
        mirror = os.environ.get(MIRROR_ENV)
        offline = "" if remotes else (f" (it reads the files from {MIRROR_ENV}={mirror})" if mirror else
                                      f" (offline: export {MIRROR_ENV}=FOLDER holding the .gz files first)")
        checks.append(Check("data/raw", TODO, f"data/raw: {what}", _fetch(remotes) + offline))
    proc = repo / "data" / "processed"
    try:
        meta = json.loads((proc / "meta.json").read_text())
        counts = meta["counts"]
    except FileNotFoundError:
        checks.append(Check("data/processed", TODO, "data/processed: missing", _fetch(remotes)))
        return checks
    except (OSError, ValueError, KeyError, TypeError) as e:
        checks.append(Check("data/processed", TODO, f"data/processed/meta.json: unreadable ({type(e).__name__})",
                            "run `dvc repro` (it rebuilds data/processed)"))
        return checks
    arrays = [n for n in ("train_images", "train_labels", "test_images", "test_labels", "train_idx", "val_idx")
              if not (proc / f"{n}.npy").is_file()]
    if arrays:
        checks.append(Check("data/processed", TODO, f"data/processed: {', '.join(a + '.npy' for a in arrays)} missing",
                            "run `dvc repro` (it rebuilds data/processed)"))
        return checks
    detail = f"data/processed: {counts['train']} train, {counts['val']} validation, {counts['test']} test images"
    split = meta.get("split") or {}
    asked = None if d_params is None else {k: getattr(d_params, k) for k in ("val_size", "train_size", "split_seed")}
    if asked is not None and split and {k: split.get(k) for k in asked} != asked:
        checks.append(Check("data/processed", TODO, f"{detail}, split differently from params.yaml's data section",
                            "run `dvc repro`"))
    else:
        checks.append(Check("data/processed", OK, detail))
    return checks


def locked_in_cache(repo: Path, out: str) -> bool:
    """Whether dvc.lock's version of output ``out`` is in the local DVC cache (a failed `dvc exp run`
    deletes the workspace copy, not the cached one)."""
    from ruamel.yaml import YAML  # what DVC reads dvc.lock with

    try:
        lock = YAML(typ="safe").load((repo / "dvc.lock").read_text()) or {}
        md5 = next(o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
                   if o.get("path") == out and o.get("md5"))
    except (OSError, KeyError, StopIteration, AttributeError, TypeError, ValueError):
        return False
    return (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def check_model(repo: Path, p, remotes: list[str], torch_ok: bool) -> list[Check]:
    path = repo / "models" / "model.pt"
    if not path.exists():
        if locked_in_cache(repo, "models/model.pt"):
            return [Check("model", TODO, "models/model.pt: missing, but DVC's cache holds the one dvc.lock names",
                          "run `dvc checkout models/model.pt` (a second, no training), or `dvc exp apply NAME` "
                          "for an experiment's model")]
        return [Check("model", TODO, "models/model.pt: missing (no trained model)",
                      _fetch(remotes) + "; then `fmnist predict PICTURE` classifies pictures")]
    if not torch_ok:
        return [Check("model", INFO, "models/model.pt: present, not loaded (torch does not import)")]
    from . import kernels
    from .checkpoint import load_checkpoint
    from .params import training_values

    try:
        _, info = load_checkpoint(path, "cpu", cpu_kernel="fused" if kernels.available() else "torch")
    except PipelineError as e:
        return [Check("model", TODO, f"models/model.pt: does not load ({str(e).split(': ', 1)[-1]})",
                      "`dvc checkout models/model.pt` restores it from the cache, or `dvc repro` retrains it")]
    trained = info.get("params", {})
    env = info.get("environment", {})
    detail = (f"models/model.pt: {info['model']}, {trained.get('epochs', '?')} epochs"
              + (f", trained with torch {env['torch']} on {env.get('device', '?')}" if env.get("torch") else ""))
    if p is not None:
        changed = sorted(k for k, v in training_values(p).items() if k in trained and trained[k] != v)
        if changed:
            return [Check("model", TODO, f"{detail}; params.yaml has since changed {', '.join(changed)}",
                          "run `dvc repro` to retrain")]
    return [Check("model", OK, detail)]


def repository_checks(repo: Path, torch_ok: bool) -> list[Check]:
    if not (repo / "dvc.yaml").is_file() or not (repo / "params.yaml").exists():
        return [Check("repository", FAIL, f"{repo}: not the fmnist repository (no dvc.yaml and params.yaml here)",
                      "run fmnist doctor from the repository root, or pass --repo PATH")]
    checks, p, raw = check_params(repo, torch_ok)
    if p is not None:
        checks += _guarded("params.yaml", lambda: check_runtime(p, raw, torch_ok))
    d_params = None
    if raw is not None:
        from .params import data_params

        d_params = data_params(raw)
    remotes: list[str] = []

    def dvc_repo() -> list[Check]:
        found, names = check_dvc_repo(repo)
        remotes.extend(names)
        return found

    dvc_checks = _guarded("DVC", dvc_repo)  # first: the next steps for data and model depend on the remotes
    checks += [c for c in dvc_checks if c.name != "DVC remote"]
    checks += _guarded("data", lambda: check_data(repo, d_params, remotes))
    checks += _guarded("model", lambda: check_model(repo, p, remotes, torch_ok))
    return checks + [c for c in dvc_checks if c.name == "DVC remote"]


def run_checks(repo: Path) -> list[Check]:
    env = environment_checks()
    torch_ok = not any(c.name == "torch" and c.state == FAIL for c in env)
    return env + repository_checks(repo, torch_ok)


def render(repo: Path, checks: list[Check]) -> str:
    """The report: one line per check, its next step indented below it, and a summary line."""
    lines = [f"fmnist doctor: {repo}"]
    for c in checks:
        lines.append(f"  {c.state:<4}  {c.detail}")
        if c.next:
            lines.append(f"        next: {c.next}")
    failed = [c.name for c in checks if c.state == FAIL]
    todo = sum(c.state == TODO for c in checks)
    if failed:
        lines.append(f"{len(failed)} problem(s) stop the default pipeline ({', '.join(dict.fromkeys(failed))}): "
                     "see the FAIL lines")
    else:
        lines.append("nothing stops the default pipeline" + (f"; {todo} thing(s) to do (todo lines)" if todo else ""))
    return "\n".join(lines)
