"""docs/figures.py: the README's pipeline picture is the graph dvc.yaml declares, drawn top-down."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("figures", ROOT / "docs" / "figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


def declared_edges() -> set[tuple[str, str]]:
    """upstream -> downstream wherever a stage depends on another's output (or a path inside it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def paths(entries):
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    outs = {stage: paths(s.get("outs")) for stage, s in stages.items()}
    return {(a, b) for b, s in stages.items() for dep in paths(s.get("deps")) for a, produced in outs.items()
            if any(dep == o or dep.startswith(o.rstrip("/") + "/") for o in produced)}


def test_pipeline_graph_is_dvc_yamls():
    dot = subprocess.run([str(Path(sys.executable).parent / "dvc"), "dag", "--dot"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    nodes, edges = figures.parse_dot(dot)
    assert set(nodes) == set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert set(edges) == declared_edges()
    depth = figures.depths(nodes, edges)
    assert all(depth[a] < depth[b] for a, b in edges)  # every arrow points down
    assert depth["extract"] == 0 and depth["evaluate"] == 3  # extract -> transform -> train -> evaluate


def test_pictures_are_written(tmp_path):
    figures.draw_pipeline(["a", "b", "c"], [("a", "b"), ("a", "c"), ("b", "c")], tmp_path / "dag.png")
    history = pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5], "accuracy": [0.6, 0.8],
                            "val_loss": [0.9, 0.6], "val_accuracy": [0.7, 0.75]})
    figures.draw_curves(history, tmp_path / "curves.png")
    for name in ("dag.png", "curves.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150
