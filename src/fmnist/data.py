"""Transform and Load: IDX decoding, the seeded train/validation split, and Datasets over ``data/processed``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import CLASSES
from .errors import DataError, first_line
from .extract import gunzip
from .fileio import atomic_dir
from .params import DataParams

log = logging.getLogger(__name__)

IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # unsigned byte, 3 dims / 1 dim
ROWS = COLS = 28
RAW_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "train_idx", "val_idx")


def _header(buf: bytes, name: str, magic: int, ndim: int) -> list[int]:
    if len(buf) < 4 + 4 * ndim:
        raise DataError(f"{name}: too short for an IDX header ({len(buf)} bytes)")
    found = int.from_bytes(buf[:4], "big")
    if found != magic:
        raise DataError(f"{name}: wrong magic number 0x{found:08x} (expected 0x{magic:08x})")
    return [int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]


def decode_images(buf: bytes, name: str) -> np.ndarray:
    """IDX3 unsigned-byte images -> uint8 array [N, 28, 28]."""
    n, rows, cols = _header(buf, name, IMAGE_MAGIC, 3)
    if (rows, cols) != (ROWS, COLS):
        raise DataError(f"{name}: images are {rows}x{cols}, expected {ROWS}x{COLS}")
    body = len(buf) - 16
    if body != n * rows * cols:
        raise DataError(f"{name}: header says {n} images ({n * rows * cols} bytes) but the file holds {body} bytes")
    return np.frombuffer(buf, np.uint8, offset=16).reshape(n, rows, cols)


def decode_labels(buf: bytes, name: str) -> np.ndarray:
    """IDX1 unsigned-byte labels -> int64 array [N], each in 0..9."""
    (n,) = _header(buf, name, LABEL_MAGIC, 1)
    if len(buf) - 8 != n:
        raise DataError(f"{name}: header says {n} labels but the file holds {len(buf) - 8}")
    labels = np.frombuffer(buf, np.uint8, offset=8)
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
        raise DataError(f"{name}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{len(CLASSES) - 1}")
    return labels.astype(np.int64)


def read_idx_pair(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split's image and label files, checking that their counts agree."""
    img_name, lbl_name = RAW_FILES[split]
    for name in (img_name, lbl_name):
        if not (raw_dir / name).is_file():
            raise DataError(f"{raw_dir / name}: file not found (run the extract stage first)")
    images = decode_images(gunzip(raw_dir / img_name), img_name)
    labels = decode_labels(gunzip(raw_dir / lbl_name), lbl_name)
    if len(images) != len(labels):
        raise DataError(f"{img_name} holds {len(images)} images but {lbl_name} holds {len(labels)} labels")
    return images, labels


def split_indices(n: int, p: DataParams) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into (train, validation) index arrays."""
    if p.val_size >= n:
        raise DataError(f"data.val_size={p.val_size} leaves no training images out of {n}")
    perm = np.random.default_rng(p.split_seed).permutation(n)
    val, train = perm[: p.val_size], perm[p.val_size :]
    if p.train_size is not None:
        if p.train_size > len(train):
            raise DataError(f"data.train_size={p.train_size} but only {len(train)} images remain after validation")
        train = train[: p.train_size]
    return np.sort(train), np.sort(val)


def transform(raw_dir: str | Path, out_dir: str | Path, p: DataParams) -> dict:
    """Decode the raw files and write ``out_dir`` whole, or nothing at all."""
    train_x, train_y = read_idx_pair(Path(raw_dir), "train")
    test_x, test_y = read_idx_pair(Path(raw_dir), "test")
    train_idx, val_idx = split_indices(len(train_x), p)
    pixels = train_x[train_idx].astype(np.float64) / 255.0  # statistics of the training split only
    meta = {
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
        "counts": {"train": len(train_idx), "val": len(val_idx), "test": len(test_x)},
        "classes": list(CLASSES),
        "split": {"val_size": p.val_size, "train_size": p.train_size, "split_seed": p.split_seed},
    }
    with atomic_dir(out_dir) as tmp:
        for name, arr in zip(ARRAYS, (train_x, train_y, test_x, test_y, train_idx, val_idx)):
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("transform: %(train)d train, %(val)d validation, %(test)d test images", meta["counts"])
    return meta


@dataclass(frozen=True)
class Split:
    """One split held in memory: uint8 images [N, 28, 28] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class Processed:
    train: Split
    val: Split
    test: Split
    mean: float
    std: float


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (run the transform stage first)") from None
    except (ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a valid .npy file ({type(e).__name__}: {first_line(e)})") from None


def load_processed(proc_dir: str | Path) -> Processed:
    meta_path = Path(proc_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        mean, std = float(meta["mean"]), float(meta["std"])
    except FileNotFoundError:
        raise DataError(f"{meta_path}: file not found (run the transform stage first)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: not valid transform metadata ({type(e).__name__}: {first_line(e)})") from None
    a = {n: torch.from_numpy(_load(Path(proc_dir) / f"{n}.npy")) for n in ARRAYS}
    x, y = a["train_images"], a["train_labels"]
    return Processed(train=Split(x[a["train_idx"]], y[a["train_idx"]]), val=Split(x[a["val_idx"]], y[a["val_idx"]]),
                     test=Split(a["test_images"], a["test_labels"]), mean=mean, std=std)


class FashionMNIST(Dataset):
    """Items (image float [1, 28, 28] in [0, 1] as torchvision's ``ToTensor()`` gives, label int).

    ``normalize=True`` standardises the pixels with the training split's mean and std.
    """

    def __init__(self, proc_dir: str | Path, split: str = "train", normalize: bool = False):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        data = load_processed(proc_dir)
        s: Split = getattr(data, split)
        self.images, self.labels = s.images, s.labels
        self.mean, self.std = (data.mean, data.std) if normalize else (0.0, 1.0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i].unsqueeze(0).float().div(255)
        return (image - self.mean) / self.std, int(self.labels[i])


class TabularDataset(Dataset):
    """The seed's custom ``Dataset``: a 2-D array, last column the integer target; items (float32 [F], int64)."""

    def __init__(self, data):
        t = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        if t.ndim != 2 or t.shape[1] < 2:
            raise ValueError(f"expected a 2-D array with at least 2 columns, got shape {tuple(t.shape)}")
        target = t[:, -1]
        if not torch.equal(target, target.round()):
            raise ValueError("the last column (the target) must hold whole numbers")
        self.features, self.targets = t[:, :-1].contiguous(), target.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i], self.targets[i]
