import pandas as pd
import torch

from fmnist import CLASSES
from fmnist.evaluation import (
    confusion_matrix, per_class_accuracy, save_confusion_png, save_misclassified_png, write_confusion_csv,
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


def test_pngs_are_written(tmp_path):
    labels = torch.tensor([0, 1, 2, 3])
    preds = torch.tensor([0, 2, 2, 1])
    save_confusion_png(tmp_path / "cm.png", confusion_matrix(preds, labels))
    shown = save_misclassified_png(tmp_path / "wrong.png", torch.zeros(4, 28, 28, dtype=torch.uint8), labels, preds)
    assert shown == 2
    for f in ("cm.png", "wrong.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
