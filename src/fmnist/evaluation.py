"""Test-set reports: per-class accuracy, the confusion matrix, and pictures of what went wrong.

Drawn with Pillow: importing matplotlib would cost the stage more than its work (docs/performance.md).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from . import CLASSES
from .fileio import atomic_path, write_csv

INK, PAPER = (0, 0, 0), (255, 255, 255)
# the ends of matplotlib's "Blues" colour map: no count, and the largest count
LIGHT, DARK = (247, 251, 255), (8, 48, 107)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, n: int = len(CLASSES)) -> torch.Tensor:
    """[actual, predicted] counts, int64 [n, n]."""
    return torch.bincount(labels.cpu() * n + preds.cpu(), minlength=n * n).reshape(n, n)


def per_class_accuracy(cm: torch.Tensor) -> dict[str, float]:
    totals = cm.sum(1).clamp(min=1)
    return {c: cm[i, i].item() / totals[i].item() for i, c in enumerate(CLASSES)}


def write_confusion_csv(path: str | Path, preds: torch.Tensor, labels: torch.Tensor) -> None:
    """One row per test image, ``actual,predicted`` class names: DVC's confusion template reads this."""
    rows = [{"actual": CLASSES[a], "predicted": CLASSES[p]} for a, p in zip(labels.tolist(), preds.tolist())]
    write_csv(path, rows, ["actual", "predicted"])


@cache
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own scalable font: no font files needed


def _save(image: Image.Image, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=False)


def _blue(fraction: float) -> tuple[int, int, int]:
    return tuple(round(a + (b - a) * fraction) for a, b in zip(LIGHT, DARK))


def _upwards(text: str, font) -> Image.Image:
    """``text`` written bottom to top, as a mask to paste ink through."""
    label = Image.new("L", (round(font.getlength(text)) + 4, 18), 0)
    ImageDraw.Draw(label).text((2, 9), text, fill=255, font=font, anchor="lm")
    return label.rotate(90, expand=True)


def save_confusion_png(path: str | Path, cm: torch.Tensor, title: str = "") -> None:
    """The [actual, predicted] counts as a heat map, each cell with its count, classes named on both axes."""
    n, cell, font, small = len(CLASSES), 48, _font(13), _font(11)
    longest = max(round(font.getlength(c)) for c in CLASSES)  # the row names' width, the column names' height
    left = 30 + longest + 8  # room for "actual" and the row names
    top, bottom = 36, 16 + longest + 24
    image = Image.new("RGB", (left + n * cell + 16, top + n * cell + bottom), PAPER)
    draw = ImageDraw.Draw(image)
    draw.text((left + n * cell / 2, top / 2), title, fill=INK, font=_font(15), anchor="mm")
    counts = cm.tolist()
    largest = max(max(map(max, counts)), 1)
    for i in range(n):
        for j in range(n):
            v = counts[i][j]
            x, y = left + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_blue(v / largest))
            draw.text((x + cell / 2, y + cell / 2), str(v), font=small, anchor="mm",
                      fill=PAPER if v > largest / 2 else INK)
        draw.text((left - 6, top + i * cell + cell / 2), CLASSES[i], fill=INK, font=font, anchor="rm")
    for j, name in enumerate(CLASSES):  # column names written upwards, as matplotlib's rotated ticks
        label = _upwards(name, font)
        image.paste(INK, (left + j * cell + (cell - label.width) // 2, top + n * cell + 6), label)
    label = _upwards("actual", font)
    image.paste(INK, (8, top + (n * cell - label.height) // 2), label)
    draw.text((left + n * cell / 2, image.height - 8), "predicted", fill=INK, font=font, anchor="md")
    _save(image, path)


def save_misclassified_png(
    path: str | Path, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, limit: int = 36
) -> int:
    """A grid of the first ``limit`` misclassified images (uint8 [N, 28, 28]), titled "actual" over "as predicted",
    drawn dark on light (as matplotlib's ``gray_r``) at three times their size."""
    wrong = (preds.cpu() != labels.cpu()).nonzero().flatten()[:limit].tolist()
    cols, scale, caption, pad = 6, 3, 30, 8
    rows = max(1, -(-len(wrong) // cols))
    cell_w, cell_h = 28 * scale + 2 * pad + 16, 28 * scale + caption + pad
    image = Image.new("RGB", (cols * cell_w, rows * cell_h), PAPER)
    draw = ImageDraw.Draw(image)
    font = _font(11)
    pixels = images.cpu()
    for k, i in enumerate(wrong):
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        draw.multiline_text((x + cell_w / 2, y + 2), f"{CLASSES[labels[i]]}\nas {CLASSES[preds[i]]}", fill=INK,
                            font=font, anchor="ma", align="center", spacing=2)
        picture = Image.fromarray(255 - pixels[i].numpy(), mode="L").resize((28 * scale,) * 2, Image.NEAREST)
        image.paste(picture, (x + (cell_w - picture.width) // 2, y + caption))
    _save(image, path)
    return len(wrong)
