"""Resuming a training cut short (``kill -9``, Ctrl-C) from the state saved after each epoch, to the bits of an
uninterrupted run; only while its :func:`fingerprint` matches, else training starts fresh and says why."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import first_line
from .fileio import atomic_path

log = logging.getLogger(__name__)

FORMAT = 2  # the payload's layout: a file of another format is not used
PACKAGE = Path(__file__).parent


def digest_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """SHA-256 over the files' names (relative to ``root``) and contents, in name order."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = path.relative_to(root).as_posix() if root is not None else path.name
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _imports(path: Path) -> set[str]:
    """The modules of this package that the file ``path`` imports, anywhere in its code."""
    modules = []  # dotted names, relative imports made absolute: "fmnist.data", "fmnist.data.Split"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, [PACKAGE.name if node.level else None, node.module]))
            modules += [f"{base}.{a.name}" for a in node.names]
    names = {m.split(".")[1] for m in modules if m.startswith(f"{PACKAGE.name}.")}
    return {name for name in names if (PACKAGE / f"{name}.py").is_file()}


def stage_sources(stage_script: str | os.PathLike) -> list[Path]:
    """The stage script, then every package file it runs: the modules it imports, transitively and from
    inside functions too, ``__init__.py``, and the C++ sources when :mod:`fmnist.kernels` is among them.
    What a stage's results depend on: its resume fingerprint, and its ``deps`` in dvc.yaml."""
    seen: set[str] = set()
    todo = _imports(Path(stage_script))
    while todo:
        name = todo.pop()
        seen.add(name)
        todo |= _imports(PACKAGE / f"{name}.py") - seen
    files = [PACKAGE / "__init__.py", *(PACKAGE / f"{name}.py" for name in seen)]
    if "kernels" in seen:
        files += [p for p in (PACKAGE / "csrc").iterdir() if p.is_file()]
    return [Path(stage_script), *sorted(files)]


def fingerprint(params: Mapping[str, Any], data_dir: str | os.PathLike, stage_script: str | os.PathLike,
                environment: Mapping[str, Any]) -> dict:
    """What a saved state must match to be used: the parameters, the processed data's bytes, the code
    (:func:`stage_sources`) and ``environment`` (:func:`fmnist.runtime.environment`)."""
    data_dir = Path(data_dir)
    script, *package = stage_sources(stage_script)
    code = digest_files(package, root=PACKAGE) + digest_files([script])
    return {
        "params": dict(params),
        "data": digest_files([p for p in data_dir.rglob("*") if p.is_file()], root=data_dir),
        "code": hashlib.sha256(code.encode()).hexdigest(),
        "environment": dict(environment),
    }


def _changed(old: Mapping, new: Mapping) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _mismatch(saved: Mapping, current: Mapping) -> str | None:
    """Why a state made under ``saved`` cannot continue under ``current``; None when it can."""
    if saved.get("params") != current["params"]:
        old, new = saved.get("params") or {}, current["params"]
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in _changed(old, new)[:4])
        return f"the parameters changed ({shown})"
    if saved.get("data") != current["data"]:
        return "the processed data changed"
    if saved.get("code") != current["code"]:
        return "the code changed (src/fmnist or the stage script)"
    if saved.get("environment") != current["environment"]:
        keys = _changed(saved.get("environment") or {}, current["environment"])
        return f"what decides the bits changed ({', '.join(keys[:4])}: see fmnist.runtime.environment)"
    return None


class SavedState:
    """One stage's resume file: ``load`` what matches, ``save`` after each epoch, ``clear`` when done."""

    def __init__(self, path: str | os.PathLike, fingerprint: Mapping):
        self.path = Path(path)
        self.fingerprint = dict(fingerprint)

    def load(self) -> dict | None:
        """The saved payload if there is one made under this fingerprint; else None, having said why."""
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable: a foreign or damaged file is not worth stopping for
            log.warning("%s: not a readable resume state (%s: %s); starting fresh", self.path, type(e).__name__,
                        first_line(e))
            return None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            log.warning("%s: resume state of another format; starting fresh", self.path)
            return None
        why = _mismatch(payload.get("fingerprint") or {}, self.fingerprint)
        if why is not None:
            log.warning("%s: not resuming: %s since it was saved; starting fresh", self.path, why)
            return None
        return payload

    def save(self, **payload: Any) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "fingerprint": self.fingerprint, **payload}, f)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # only when empty: another stage's state may be beside it


def snapshot(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every file under ``folder``, relative name -> bytes (as a uint8 tensor, which weights_only loads)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
        if p.stat().st_size else torch.empty(0, dtype=torch.uint8)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def restore(folder: str | os.PathLike, files: Mapping[str, torch.Tensor]) -> None:
    """Write ``files`` (from :func:`snapshot`) under ``folder``."""
    for name, data in files.items():
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ValueError(f"resume state: unsafe file name {name!r}")
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.numpy().tobytes())


def run_state(model: torch.nn.Module, optimizer, scheduler, generator: torch.Generator, manager, epoch: int) -> dict:
    """Everything the rest of a run depends on after ``epoch`` finished epochs."""
    device = generator.device
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "rows": manager.run_rows(),
        "logs": snapshot(manager.log_dir) if manager.log_dir is not None else {},
    }


def restore_run_state(state: dict, model: torch.nn.Module, optimizer, scheduler, generator: torch.Generator) -> int:
    """Put a :func:`run_state` back; returns the number of epochs it had finished."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], generator.device)
    return state["epoch"]
