"""``fmnist predict``: classify anyone's pictures with a trained checkpoint, prepared as the training images were.

A picture is made to look like Fashion-MNIST's images (light item on black, trimmed, centred, 28x28) and
classified by the evaluate stage's own path, in the checkpoint's numerics and precision; docs/command.md
describes each step. A 28x28 picture is taken as it is (inverted if need be).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from . import CLASSES, kernels, runtime
from .checkpoint import model_from, read_checkpoint, trained_params
from .data import Split
from .engine import predict, to_device
from .errors import DataError, first_line
from .fileio import os_reason

SIZE = 28  # the training images' side, in pixels
INVERT = ("auto", "yes", "no")
CROP_THRESHOLD = 24  # grey levels (of 255) from the background that count as the item, above JPEG noise
MAX_PIXELS = 64_000_000  # the most a picture may decode to: a 64 Mpx RGB picture takes 192 MB, its grey copy 64 MB
DRAFT_SIDE = 1024  # a JPEG's shorter side is decoded at no less (see open_scaled)


@dataclass(frozen=True)
class Picture:
    """One picture prepared for the model: ``pixels`` uint8 [28, 28], light item on a dark background."""

    path: str
    pixels: np.ndarray
    width: int  # the picture's size as read, in pixels
    height: int
    inverted: bool


@dataclass(frozen=True)
class Prediction:
    """A picture and the model's class probabilities for it, float [10] summing to 1."""

    picture: Picture
    probabilities: np.ndarray

    def top(self, k: int) -> list[tuple[int, str, float]]:
        """The ``k`` most probable classes as (index, name, probability), most probable first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(int(i), CLASSES[i], float(self.probabilities[i])) for i in order]


def expand(path: str | Path) -> list[Path]:
    """``path`` itself (reading it reports it if missing), or a folder's image files by extension, sorted,
    without subfolders or hidden files."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    extensions = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in extensions and not p.name.startswith(".")
                   and p.is_file())
    if not found:
        raise DataError(f"{path}: no image files in this folder (subfolders are not searched)")
    return found


def to_gray(img: Image.Image) -> np.ndarray:
    """The picture as uint8 grey levels [H, W], upright per its EXIF orientation, transparency as white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # 16-bit and float grayscale
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max() > 255):
            a = a / 257  # 16-bit range onto 8-bit
        elif img.mode == "F" and a.max() <= 1:
            a = a * 255  # floats in [0, 1]
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # on white: the background a product photo has
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def border(gray: np.ndarray) -> np.ndarray:
    """The pixels of the outer ring, one 28th of the shorter side wide (one pixel at 28x28)."""
    w = max(1, min(gray.shape) // SIZE)
    if min(gray.shape) <= 2 * w:
        return gray.ravel()
    return np.concatenate([gray[:w].ravel(), gray[-w:].ravel(), gray[w:-w, :w].ravel(), gray[w:-w, -w:].ravel()])


def light_background(gray: np.ndarray) -> bool:
    """Whether the border's median (items often touch the edges) is above mid-grey: a photo to be inverted."""
    return float(np.median(border(gray))) > 127.5


def pad_square(gray: np.ndarray, value: int) -> np.ndarray:
    """``gray`` centred on a square canvas of ``value``, as wide as its longer side."""
    h, w = gray.shape
    side = max(h, w)
    canvas = np.full((side, side), value, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = gray
    return canvas


def prepare(gray: np.ndarray, invert: str = "auto", crop: bool = True) -> tuple[np.ndarray, bool]:
    """(uint8 [28, 28] as the training images look, whether it was inverted) for grey levels [H, W]."""
    if invert not in INVERT:
        raise ValueError(f"invert must be one of {', '.join(INVERT)}, got {invert!r}")
    inverted = light_background(gray) if invert == "auto" else invert == "yes"
    if inverted:
        gray = 255 - gray
    if gray.shape == (SIZE, SIZE):
        return np.ascontiguousarray(gray), inverted  # already in the data set's format
    background = int(np.median(border(gray)))
    if crop:  # to the item: one in the middle of a wide photo would otherwise shrink to a sliver
        item = np.abs(gray.astype(np.int16) - background) > CROP_THRESHOLD
        if item.any():  # a blank picture has nothing to crop to
            rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
            gray = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    square = Image.fromarray(pad_square(gray, background))
    if square.size != (SIZE, SIZE):
        square = square.resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(square, dtype=np.uint8).copy(), inverted


def open_scaled(img: Image.Image) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) while its shorter side stays at
    least :data:`DRAFT_SIDE`: a phone photo then costs a fraction of its memory, and the 28x28 result barely
    moves. Other formats decode whole."""
    if img.format == "JPEG" and min(img.size) > DRAFT_SIDE:
        scale = min(img.size) / DRAFT_SIDE
        img.draft(img.mode, (int(img.width / scale), int(img.height / scale)))


def read_picture(source: str | Path | BinaryIO, invert: str = "auto", crop: bool = True,
                 name: str | None = None) -> Picture:
    """Read and :func:`prepare` one picture from a path or an open binary file (``name`` then says what to call
    it); a missing, unreadable, oversized or non-image file raises a one-line DataError."""
    label = name if name is not None else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # below MAX_PIXELS is not an error
            with Image.open(source) as img:
                width, height = img.size
                open_scaled(img)
                if img.width * img.height > MAX_PIXELS:  # checked on the header, before any pixel is decoded
                    raise DataError(f"{label}: too large to read safely ({img.width}x{img.height} pixels; "
                                    f"at most {MAX_PIXELS // 10**6} million)")
                img.load()
                scaled = img.size
                gray = to_gray(img)
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{label}: not an image (Pillow cannot identify its format)") from None
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit: refused on the header as well
        raise DataError(f"{label}: too large to read safely ({e})") from None
    except OSError as e:  # permission denied, a truncated or corrupt file
        raise DataError(f"{label}: cannot read the image ({os_reason(e)})") from None
    except (SyntaxError, ValueError, EOFError) as e:  # what some of Pillow's decoders raise for broken files
        raise DataError(f"{label}: cannot read the image ({type(e).__name__}: {first_line(e)})") from None
    if gray.size == 0:
        raise DataError(f"{label}: the image has no pixels")
    if gray.shape != scaled[::-1]:  # turned upright per its EXIF orientation
        width, height = height, width
    pixels, inverted = prepare(gray, invert, crop)
    return Picture(label, pixels, width, height, inverted)


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model in eval mode and its metadata, its ``numerics`` pinned before its first tensor operation.

    On the CPU the seed Network runs the fused kernel when it is built, else PyTorch's layers: the same function.
    """
    payload = read_checkpoint(path, device)
    runtime.configure(dataclasses.replace(trained_params(payload), device=device.type))
    return model_from(payload, path, device, cpu_kernel="fused" if kernels.available() else "torch")


def probabilities(
    model: torch.nn.Module, info: dict, pixels: np.ndarray, device: torch.device, tta: bool = False,
) -> np.ndarray:
    """Class probabilities float [N, 10] for pictures uint8 [N, 28, 28], in the checkpoint's precision;
    ``tta`` averages each picture with its mirror image, as the evaluate stage's ``tta: true``."""
    norm = info["normalize"]
    split = Split(torch.from_numpy(np.array(pixels, dtype=np.uint8)), torch.zeros(len(pixels), dtype=torch.long))
    x = to_device(split, norm["mean"], norm["std"], device).x
    return torch.softmax(predict(model, x, tta=tta, precision=trained_params(info).precision), dim=1).cpu().numpy()


def classify(
    model: torch.nn.Module, info: dict, pictures: Sequence[Picture], device: torch.device, tta: bool = False,
) -> list[Prediction]:
    if not pictures:
        return []
    probs = probabilities(model, info, np.stack([p.pixels for p in pictures]), device, tta)
    return [Prediction(p, row) for p, row in zip(pictures, probs, strict=True)]


def as_text(pred: Prediction, k: int) -> str:
    """``shoe.jpg (inverted): Sneaker 91.2%, Sandal 6.0%, Ankle boot 2.1%``"""
    classes = ", ".join(f"{name} {100 * prob:.1f}%" for _, name, prob in pred.top(k))
    return f"{pred.picture.path}{' (inverted)' if pred.picture.inverted else ''}: {classes}"


def as_record(pred: Prediction, k: int) -> dict:
    """One picture's entry in ``--json`` output."""
    pic = pred.picture
    top = [{"class": name, "index": i, "probability": prob} for i, name, prob in pred.top(k)]
    return {"file": pic.path, "width": pic.width, "height": pic.height, "inverted": pic.inverted, "top": top}
