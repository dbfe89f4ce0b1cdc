from collections import Counter

import pandas as pd
import torch
from PIL import Image

from fmnist import CLASSES
from fmnist.evaluation import (
    DARK,
    LIGHT,
    confusion_matrix,
    per_class_accuracy,
    save_confusion_png,
    save_misclassified_png,
    write_confusion_csv,
)


def test_confusion_matrix_counts_actual_rows_against_predicted_columns():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix(preds, labels)
    assert cm.shape == (10, 10) and cm.sum() == 6
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[2, 0] == 1 and cm[2, 2] == 2
    acc = per_class_accuracy(cm)
    assert list(acc) == list(CLASSES)
    assert acc["T-shirt/top"] == 0.5 and acc["Trouser"] == 1.0 and acc["Pullover"] == 2 / 3 and acc["Bag"] == 0.0


def test_confusion_csv_has_class_names_per_image(tmp_path):
    write_confusion_csv(tmp_path / "c.csv", torch.tensor([9, 0]), torch.tensor([9, 6]))
    df = pd.read_csv(tmp_path / "c.csv")
    assert df.to_dict("records") == [
        {"actual": "Ankle boot", "predicted": "Ankle boot"},
        {"actual": "Shirt", "predicted": "T-shirt/top"},
    ]


def colour_counts(picture: Image.Image) -> Counter:
    return Counter({colour: n for n, colour in picture.convert("RGB").getcolors(picture.width * picture.height)})


def test_the_confusion_png_shades_each_cell_by_its_count(tmp_path):
    labels = torch.tensor([0] * 9 + [1, 2, 3])
    preds = torch.tensor([0] * 9 + [2, 2, 1])
    save_confusion_png(tmp_path / "cm.png", confusion_matrix(preds, labels), "title")
    colours = colour_counts(Image.open(tmp_path / "cm.png"))
    # 100 cells of 48 x 48 less their digits: the largest count (9) in the darkest blue, the 96 empty
    # cells in the lightest, the three cells of 1 in a blue a ninth of the way between
    assert 0.7 * 48 * 48 < colours[DARK] < 48 * 48
    assert 96 * 0.7 * 48 * 48 < colours[LIGHT] < 96 * 48 * 48
    ninth = tuple(round(a + (b - a) / 9) for a, b in zip(LIGHT, DARK))
    assert 3 * 0.7 * 48 * 48 < colours[ninth] < 3 * 48 * 48


def test_the_misclassified_png_shows_each_wrong_image_once_at_three_times_its_size(tmp_path):
    labels = torch.tensor([0, 1, 2, 3])
    preds = torch.tensor([0, 2, 2, 1])
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[1], images[3] = 254, 253  # drawn dark on light: as the grey levels 1 and 2, which no text uses
    shown = save_misclassified_png(tmp_path / "wrong.png", images, labels, preds)
    assert shown == 2
    picture = Image.open(tmp_path / "wrong.png")
    assert picture.format == "PNG"
    colours = colour_counts(picture)
    assert colours[(1, 1, 1)] == colours[(2, 2, 2)] == 84 * 84
    assert colours[(255, 255, 255)] + 2 * 84 * 84 < picture.width * picture.height  # and the captions
