"""``fmnist doctor``: the installation check (:mod:`fmnist.doctor_env`), and whether this repository
can run its pipeline: params.yaml, DVC, the data, the model, a remote. Nothing is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from pathlib import Path

from ruamel.yaml import YAML

from . import params, runtime
from .doctor_env import FAIL, INFO, OK, TODO, Check, environment_checks, guarded
from .errors import ParamsError, PipelineError, first_line
from .extract import FILES, MIRROR_ENV


def check_params(
    repo: Path, torch_ok: bool,
) -> tuple[list[Check], params.TrainParams | None, params.DataParams | None, dict]:
    """(checks, train params, data params, sweep grid); None, None, {} when params.yaml is invalid."""
    try:
        raw = params.load(repo / "params.yaml")
        p, d = params.train_params(raw), params.data_params(raw)
        grid = params.sweep_grid(raw)
        if torch_ok:  # fmnist.tracking imports torch
            from .tracking import RunBuilder

            params.sweep_runs(raw, RunBuilder.get_runs(grid))  # every run, as the sweep stage checks them
    except PipelineError as e:
        fail = Check("params.yaml", FAIL, str(e), "fix params.yaml (its comments say what each key takes)")
        return [fail], None, None, {}
    detail = (f"params.yaml: valid (model {p.model}, {p.epochs} epochs, device {p.device}, cpu_kernel {p.cpu_kernel}, "
              f"numerics {p.numerics}; data.val_size {d.val_size})")
    return [Check("params.yaml", OK, detail)], p, d, grid


def check_runtime(p: params.TrainParams, grid: dict, torch_ok: bool) -> list[Check]:
    """What params.yaml asks of this machine: a GPU, AVX2 for portable numerics, the fused kernel, and for
    bfloat16 on the CPU native numerics (the stages refuse it otherwise) and, for speed, AVX512_BF16 or AMX."""
    checks = []
    if p.numerics == "portable" and "AVX2" not in runtime.cpu_isa():  # an x86-64 flag: absent on ARM
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
                                                       "instructions, so the bfloat16 speed-up of "
                                                       "docs/performance.md does not apply",
                                    "compare with precision: auto (float32 on the CPU)"))
    models = {p.model, *grid.get("model", ["network"])}  # a sweep run without one: the Network
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


def check_dvc_repo(repo: Path) -> list[Check]:
    """The .dvc folder, git beside it, and one ``DVC remote`` line per configured remote (then its problems)."""
    if not (repo / ".dvc").is_dir():
        return [Check("DVC", FAIL, f"{repo}: not a DVC repository (no .dvc folder)", "dvc init")]
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(repo / ".dvc"))
    except ConfigError as e:
        return [Check("DVC config", FAIL, f"DVC's configuration is invalid ({first_line(e)})",
                      "dvc config --list shows it; fix .dvc/config")]
    checks = []
    if not config["core"].get("no_scm") and not any((d / ".git").exists() for d in (repo, *repo.parents)):
        checks.append(Check("git", FAIL, f"{repo} is not in a git repository, which DVC needs",
                            "git init (or dvc config core.no_scm true)"))
    remotes = dict(config["remote"])
    if not remotes:
        return checks + [Check("DVC remote", TODO, "DVC remote: none (data and models are only on this machine)",
                               "`dvc remote add -d storage s3://BUCKET/fmnist` (or a shared folder), then `dvc push`; "
                               "see docs/sharing.md")]
    default = config["core"].get("remote")
    for name, conf in sorted(remotes.items()):
        url = conf.get("url", "?")
        mark = " (default)" if name == default else ""
        checks.append(Check("DVC remote", OK, f"DVC remote {name}{mark}: {url}"))
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme in ("s3", "gs", "azure", "ssh") and importlib.util.find_spec(f"dvc_{scheme}") is None:
            extra = " (pip install -e '.[s3]')" if scheme == "s3" else ""
            checks.append(Check("DVC remote", TODO, f"DVC remote {name} needs the dvc-{scheme} package, which is not "
                                                    "installed", f"pip install dvc-{scheme}{extra}"))
    if default is None:
        checks.append(Check("DVC remote", TODO, "no default remote: dvc push and dvc pull need -r NAME",
                            f"dvc remote default {sorted(remotes)[0]}"))
    return checks


def _fetch(remote: bool) -> str:
    return "run `dvc pull`, or `dvc repro` to make it" if remote else "run `dvc repro`"


def check_data(repo: Path, d, remote: bool) -> list[Check]:
    checks = []
    raw = repo / "data" / "raw"
    missing = [f for f in FILES if not (raw / f).is_file()]
    if not missing:
        checks.append(Check("data/raw", OK, f"data/raw: the {len(FILES)} Fashion-MNIST files"))
    else:
        what = "missing" if len(missing) == len(FILES) else f"{', '.join(missing)} missing"
        mirror = os.environ.get(MIRROR_ENV)
        offline = "" if remote else (f" (it reads the files from {MIRROR_ENV}={mirror})" if mirror else
                                     f" (offline: export {MIRROR_ENV}=FOLDER holding the .gz files first)")
        checks.append(Check("data/raw", TODO, f"data/raw: {what}", _fetch(remote) + offline))
    proc = repo / "data" / "processed"
    try:
        meta = json.loads((proc / "meta.json").read_text())
        counts = meta["counts"]
    except FileNotFoundError:
        return checks + [Check("data/processed", TODO, "data/processed: missing", _fetch(remote))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return checks + [Check("data/processed", TODO, f"data/processed/meta.json: unreadable ({type(e).__name__})",
                               "run `dvc repro` (it rebuilds data/processed)")]
    arrays = [n for n in ("train_images", "train_labels", "test_images", "test_labels", "train_idx", "val_idx")
              if not (proc / f"{n}.npy").is_file()]
    if arrays:
        return checks + [Check("data/processed", TODO, f"data/processed: {', '.join(a + '.npy' for a in arrays)} "
                                                       "missing", "run `dvc repro` (it rebuilds data/processed)")]
    detail = f"data/processed: {counts['train']} train, {counts['val']} validation, {counts['test']} test images"
    split = meta.get("split") or {}
    if d is not None and split and any(split.get(k) != getattr(d, k) for k in ("val_size", "train_size", "split_seed")):
        return checks + [Check("data/processed", TODO, f"{detail}, split differently from params.yaml's data section",
                               "run `dvc repro`")]
    return checks + [Check("data/processed", OK, detail)]


def locked_in_cache(repo: Path, out: str) -> bool:
    """Whether dvc.lock's version of ``out`` is in the local DVC cache (a failed `dvc exp run` deletes only
    the workspace copy)."""
    try:
        lock = YAML(typ="safe").load((repo / "dvc.lock").read_text()) or {}
        md5 = next(o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
                   if o.get("path") == out and o.get("md5"))
    except (OSError, KeyError, StopIteration, AttributeError, TypeError, ValueError):
        return False
    return (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def check_model(repo: Path, p, remote: bool, torch_ok: bool) -> list[Check]:
    path = repo / "models" / "model.pt"
    if not path.exists():
        if locked_in_cache(repo, "models/model.pt"):
            return [Check("model", TODO, "models/model.pt: missing, but DVC's cache holds the one dvc.lock names",
                          "run `dvc checkout models/model.pt` (a second, no training), or `dvc exp apply NAME` "
                          "for an experiment's model")]
        return [Check("model", TODO, "models/model.pt: missing (no trained model)",
                      _fetch(remote) + "; then `fmnist predict PICTURE` classifies pictures")]
    if not torch_ok:
        return [Check("model", INFO, "models/model.pt: present, not loaded (torch does not import)")]
    from . import kernels
    from .checkpoint import load_checkpoint

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
        changed = sorted(k for k, v in params.training_values(p).items() if k in trained and trained[k] != v)
        if changed:
            return [Check("model", TODO, f"{detail}; params.yaml has since changed {', '.join(changed)}",
                          "run `dvc repro` to retrain")]
    return [Check("model", OK, detail)]


def repository_checks(repo: Path, torch_ok: bool) -> list[Check]:
    if not (repo / "dvc.yaml").is_file() or not (repo / "params.yaml").exists():
        return [Check("repository", FAIL, f"{repo}: not the fmnist repository (no dvc.yaml and params.yaml here)",
                      "run fmnist doctor from the repository root, or pass --repo PATH")]
    checks, p, d, grid = check_params(repo, torch_ok)
    if p is not None:  # params.yaml is valid
        checks += guarded("params.yaml", lambda: check_runtime(p, grid, torch_ok))
    dvc_checks = guarded("DVC", lambda: check_dvc_repo(repo))  # first: data's and model's next steps need the remotes
    remote = any(c.name == "DVC remote" and c.state == OK for c in dvc_checks)  # an ok line per configured remote
    checks += [c for c in dvc_checks if c.name != "DVC remote"]
    checks += guarded("data", lambda: check_data(repo, d, remote))
    checks += guarded("model", lambda: check_model(repo, p, remote, torch_ok))
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
