"""Helpers for the end-to-end tests: the real dvc and git commands in a temporary copy of this repository."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import ROOT

SMALL = {"data": {"val_size": 500, "train_size": 2000, "split_seed": 0}, "epochs": 2, "batch_size": 100}


ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def sh(cwd: Path, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with this venv first on PATH (and ``env``'s changes); fail with its output."""
    proc = subprocess.run(cmd, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_params(repo: Path, **changes) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def worktree_copy(dest: Path) -> Path:
    """This repository's tracked and unignored files at ``dest``: no data, no model, no DVC cache, no git."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def repo_copy(dest: Path, mirror: Path) -> Path:
    """A git repository at ``dest`` holding this one's tracked files (no outputs), with small-data parameters."""
    worktree_copy(dest)
    (dest / "dvc.lock").unlink(missing_ok=True)
    set_params(dest, **SMALL, sweep={"lr": [0.01, 0.02], "batch_size": [100], "epochs": [1]})
    ENV["FMNIST_MIRROR"] = str(mirror)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "config", "user.email", "e2e@example.com")
    sh(dest, "git", "config", "user.name", "e2e")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "small")
    return dest


def git_clone(source: Path, dest: Path, *options: str) -> Path:
    """What anyone cloning the repository ``source`` gets: git's files alone, no DVC cache."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sh(dest.parent, "git", "clone", "-q", *options, str(source), str(dest))
    return dest


def repo_clone(source: Path, dest: Path) -> Path:
    """A copy of the repository ``source`` (work tree, git, DVC cache), as a second user would have it.

    DVC keeps its hash state outside the repository, keyed by path, so the copy starts with none.
    """
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
    return dest
