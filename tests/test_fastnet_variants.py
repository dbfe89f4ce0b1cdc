"""bench/fastnet_variants.py's augmentations do what the README's table says they did."""

import importlib.util

import torch

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("fastnet_variants", ROOT / "bench" / "fastnet_variants.py")
variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(variants)

BACKGROUND = -0.8


def images(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` [28, 28] moved down by ``dy`` and right by ``dx`` pixels, background where it was not."""
    out = torch.full_like(x, BACKGROUND)
    out[max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = x[max(-dy, 0):28 - max(dy, 0),
                                                                    max(-dx, 0):28 - max(dx, 0)]
    return out


def test_translations_move_each_image_by_at_most_the_shift_and_fill_with_background():
    x = images()
    out = variants.Augment(shift=2, cutout=0, background=BACKGROUND, generator=torch.Generator().manual_seed(0))(x)
    moves = set()
    for original, augmented in zip(x[:, 0], out[:, 0]):
        found = [(flip, dy, dx) for flip in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(shifted(original.flip(-1) if flip else original, dy, dx), augmented)]
        assert len(found) == 1
        moves.add(found[0])
    assert len(moves) > 5  # drawn per image, not one move for the batch


def test_cutout_blanks_one_square_of_the_given_side_at_most():
    x = images()
    aug = variants.Augment(shift=0, cutout=9, background=BACKGROUND, generator=torch.Generator().manual_seed(0))
    out = aug(x)
    flips = torch.rand(len(x), generator=torch.Generator().manual_seed(0)) < 0.5  # the generator's first draw
    sides = []
    for original, augmented, flip in zip(x[:, 0], out[:, 0], flips):
        changed = augmented != (original.flip(-1) if flip else original)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        assert (augmented[changed] == BACKGROUND).all()
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert height <= 9 and width <= 9 and int(changed.sum()) == height * width  # one solid square
        sides.append((height, width))
    assert (9, 9) in sides  # one away from the border is whole
