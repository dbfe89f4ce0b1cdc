"""``fmnist doctor``: the tutorial's installation check, and whether this repository can run its pipeline.

Every check gives one line, a state and, where something is to be done, the next step:

- ``ok``: present and working;
- ``info``: worth knowing, nothing to do (no GPU, say);
- ``todo``: missing but made by the pipeline or optional (data, a trained model, a DVC remote);
- ``FAIL``: the default pipeline (``dvc repro`` with this params.yaml) cannot run: params.yaml
  invalid, a package that does not import, a kernel params.yaml asks for and that is not built.

Only ``FAIL`` makes the exit status non-zero. Nothing is written, nothing is downloaded. The checks
of this machine are in :mod:`fmnist.doctor_env`, those of the repository in :mod:`fmnist.doctor_repo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError, first_line

OK, INFO, TODO, FAIL = "ok", "info", "todo", "FAIL"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``state`` one of ok, info, todo, FAIL; ``next`` what to do, if anything."""

    name: str
    state: str
    detail: str
    next: str = ""


def guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """Run ``check``; an exception it did not expect becomes one FAIL line, not a traceback."""
    try:
        return check()
    except PipelineError as e:
        return [Check(name, FAIL, str(e))]
    except Exception as e:  # noqa: BLE001 (doctor reports what is broken, whatever it is)
        return [Check(name, FAIL, f"{type(e).__name__}: {first_line(e)}")]


def run_checks(repo: Path) -> list[Check]:
    from . import doctor_env, doctor_repo  # they import Check from here

    env = doctor_env.environment_checks()
    torch_ok = not any(c.name == "torch" and c.state == FAIL for c in env)
    return env + doctor_repo.repository_checks(repo, torch_ok)


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
