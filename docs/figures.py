"""The README's pictures, drawn from this workspace's last run of the pipeline.

    dvc repro && python docs/figures.py     # writes docs/img/{pipeline,curves,confusion,misclassified}.png

pipeline.png is the stage graph as ``dvc dag`` gives it; curves.png the per-epoch loss and accuracy
of the train stage (metrics/train_history.csv); confusion.png and misclassified.png are the
evaluate stage's own pictures (plots/), copied. Commit the results when the committed metrics
change, so that a reader sees what the pipeline produces before running anything.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EDGE = re.compile(r'^"([^"]+)"\s*->\s*"([^"]+)";?$')
NODE = re.compile(r'^"([^"]+)";?$')


def parse_dot(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(stages, edges upstream -> downstream) from ``dvc dag --dot``."""
    nodes, edges = [], []
    for line in (line.strip() for line in text.splitlines()):
        if m := EDGE.match(line):
            edges.append((m[1], m[2]))
        elif m := NODE.match(line):
            nodes.append(m[1])
    return nodes, edges


def depths(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Each stage's row in the drawing: the length of the longest path of stages leading to it."""
    depth = {n: 0 for n in nodes}
    for _ in nodes:  # a DAG's longest path has at most len(nodes) - 1 edges
        for a, b in edges:
            depth[b] = max(depth[b], depth[a] + 1)
    return depth


def draw_pipeline(nodes: list[str], edges: list[tuple[str, str]], path: Path) -> None:
    depth = depths(nodes, edges)
    rows: dict[int, list[str]] = {}
    for n in nodes:
        rows.setdefault(depth[n], []).append(n)
    width = max(len(r) for r in rows.values())
    pos = {n: ((i - (len(r) - 1) / 2) * 2.2, -d * 1.2) for d, r in rows.items() for i, n in enumerate(r)}
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * width, 0.6 + 1.2 * len(rows)))
    for a, b in edges:
        ax.annotate("", xy=pos[b], xytext=pos[a],
                    arrowprops={"arrowstyle": "-|>", "color": "#555", "shrinkA": 16, "shrinkB": 16, "lw": 1.2})
    for n, (x, y) in pos.items():
        ax.text(x, y, n, ha="center", va="center", fontsize=11, family="monospace",
                bbox={"boxstyle": "round,pad=0.5", "fc": "#e8f0fe", "ec": "#3367d6"})
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    ax.set(xlim=(min(xs) - 1.2, max(xs) + 1.2), ylim=(min(ys) - 0.6, max(ys) + 0.6))
    ax.axis("off")
    save(fig, path)


def draw_curves(history: pd.DataFrame, path: Path) -> None:
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((loss, "loss", "cross-entropy"), (acc, "accuracy", "accuracy")):
        ax.plot(history["epoch"], history[key], marker="o", ms=3, label="train")
        ax.plot(history["epoch"], history[f"val_{key}"], marker="o", ms=3, label="validation")
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    last = history.iloc[-1]
    fig.suptitle(f"train stage: {len(history)} epochs, validation accuracy {last['val_accuracy']:.2%}", fontsize=10)
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    needed = [ROOT / "metrics" / "train_history.csv", ROOT / "plots" / "confusion.png",
              ROOT / "plots" / "misclassified.png"]
    missing = [str(p.relative_to(ROOT)) for p in needed if not p.is_file()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} missing: run `dvc repro` (or `dvc pull`) first")
    dag = subprocess.run(["dvc", "dag", "--dot"], cwd=ROOT, capture_output=True, text=True, check=False)
    if dag.returncode != 0:
        sys.exit(f"error: dvc dag failed: {dag.stderr.strip().splitlines()[-1] if dag.stderr.strip() else dag.returncode}")
    args.out.mkdir(parents=True, exist_ok=True)
    draw_pipeline(*parse_dot(dag.stdout), args.out / "pipeline.png")
    draw_curves(pd.read_csv(needed[0]), args.out / "curves.png")
    for src in needed[1:]:
        shutil.copyfile(src, args.out / src.name)
    for p in sorted(args.out.glob("*.png")):
        print(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: {p.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
