import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fmnist.data import FashionMNIST, TabularDataset, load_processed, split_indices, transform
from fmnist.errors import DataError
from fmnist.params import DataParams

from .conftest import idx_images, idx_labels, write_raw

RNG = np.random.default_rng(1)


def test_transform_writes_uint8_images_a_disjoint_seeded_split_and_train_only_stats(tmp_path):
    raw = write_raw(tmp_path / "raw", n_train=200, n_test=50)
    meta = transform(raw, tmp_path / "out", DataParams(val_size=40, split_seed=3))
    train_idx = np.load(tmp_path / "out" / "train_idx.npy")
    val_idx = np.load(tmp_path / "out" / "val_idx.npy")
    assert len(train_idx) == 160 and len(val_idx) == 40
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(200))
    images = np.load(tmp_path / "out" / "train_images.npy")
    assert images.dtype == np.uint8 and images.shape == (200, 28, 28)
    expected = images[train_idx] / 255.0
    assert meta["mean"] == pytest.approx(expected.mean(), abs=1e-12)
    assert meta["std"] == pytest.approx(expected.std(), abs=1e-12)
    assert meta["mean"] != pytest.approx((images / 255.0).mean(), abs=1e-9)  # not the whole set
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["counts"] == {"train": 160, "val": 40, "test": 50}


def test_split_is_reproducible_and_depends_on_the_seed():
    a = split_indices(1000, DataParams(val_size=100, split_seed=0))
    b = split_indices(1000, DataParams(val_size=100, split_seed=0))
    c = split_indices(1000, DataParams(val_size=100, split_seed=1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_train_size_takes_a_subset_of_the_remainder():
    train, val = split_indices(1000, DataParams(val_size=100, train_size=300))
    assert len(train) == 300 and not set(train) & set(val)
    with pytest.raises(DataError, match="data.train_size=950"):
        split_indices(1000, DataParams(val_size=100, train_size=950))


def gz(b: bytes) -> bytes:
    return gzip.compress(b)


@pytest.mark.parametrize(
    "replace, expected",
    [
        ({"train_images_idx3_ubyte_gz": gz(idx_images(RNG.integers(0, 255, (5, 28, 28)), magic=0x801))},
         "train-images-idx3-ubyte.gz: wrong magic number 0x00000801 (expected 0x00000803)"),
        ({"train_labels_idx1_ubyte_gz": gz(idx_labels(RNG.integers(0, 10, 7), magic=0x803))},
         "train-labels-idx1-ubyte.gz: wrong magic number"),
        ({"t10k_labels_idx1_ubyte_gz": gz(idx_labels(RNG.integers(0, 10, 31)))},
         "t10k-images-idx3-ubyte.gz holds 30 images but t10k-labels-idx1-ubyte.gz holds 31 labels"),
        ({"train_labels_idx1_ubyte_gz": gz(idx_labels(np.array([1] * 119 + [10])))},
         "train-labels-idx1-ubyte.gz: label 10 at index 119 is outside 0..9"),
        ({"train_images_idx3_ubyte_gz": gz(idx_images(RNG.integers(0, 255, (5, 28, 28)), count=6))},
         "train-images-idx3-ubyte.gz: header says 6 images"),
        ({"train_images_idx3_ubyte_gz": gz(idx_images(RNG.integers(0, 255, (5, 28, 28)))[:10])},
         "train-images-idx3-ubyte.gz: too short for an IDX header"),
        ({"t10k_images_idx3_ubyte_gz": gz(b"\0" * 4000)[:-20]}, "t10k-images-idx3-ubyte.gz: truncated gzip"),
        ({"t10k_images_idx3_ubyte_gz": b"PK\x03\x04 a zip file"}, "t10k-images-idx3-ubyte.gz: not a gzip file"),
    ],
)
def test_bad_raw_files_fail_with_one_line_and_no_output(tmp_path, replace, expected):
    raw = write_raw(tmp_path / "raw", **replace)
    with pytest.raises(DataError) as e:
        transform(raw, tmp_path / "out", DataParams(val_size=10))
    assert str(e.value).startswith(expected)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_missing_raw_file_names_it(tmp_path):
    raw = write_raw(tmp_path / "raw")
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: file not found"):
        transform(raw, tmp_path / "out", DataParams(val_size=10))


def test_dataset_yields_float_images_of_shape_1x28x28_in_batches(processed_small):
    ds = FashionMNIST(processed_small, "train")
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert 0.0 <= image.min() and image.max() <= 1.0 and isinstance(label, int)
    images, labels = next(iter(DataLoader(ds, batch_size=16)))
    assert images.shape == (16, 1, 28, 28) and labels.shape == (16,) and labels.dtype == torch.int64
    assert [len(FashionMNIST(processed_small, s)) for s in ("train", "val", "test")] == [600, 100, 200]


def test_normalized_dataset_uses_training_statistics(processed_small):
    plain, norm = FashionMNIST(processed_small, "val"), FashionMNIST(processed_small, "val", normalize=True)
    data = load_processed(processed_small)
    torch.testing.assert_close(norm[3][0], (plain[3][0] - data.mean) / data.std)


def test_processed_images_equal_torchvision_fashion_mnist_to_tensor(raw_full, processed_full, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in raw_full.iterdir():  # torchvision reads the decompressed files from <root>/FashionMNIST/raw
        (raw / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    tf = torchvision.transforms.ToTensor()
    data = load_processed(processed_full)
    val_idx = torch.from_numpy(np.load(processed_full / "val_idx.npy"))
    train_idx = torch.from_numpy(np.load(processed_full / "train_idx.npy"))
    for train, ours in ((True, None), (False, FashionMNIST(processed_full, "test"))):
        ref = torchvision.datasets.FashionMNIST(tmp_path, train=train, download=False, transform=tf)
        if train:  # our training images are split: every one of both parts, by index
            assert torch.equal(data.val.images, ref.data[val_idx]) and torch.equal(data.val.labels, ref.targets[val_idx])
            assert torch.equal(data.train.images, ref.data[train_idx])
            assert torch.equal(data.train.labels, ref.targets[train_idx])
            assert len(train_idx) + len(val_idx) == len(ref)
            ours_x = data.train.images[::50].unsqueeze(1).float() / 255  # as the training path scales them
            pairs = ((x, int(j)) for x, j in zip(ours_x, train_idx[::50]))
        else:
            assert torch.equal(ours.images, ref.data) and torch.equal(ours.labels, ref.targets)
            pairs = ((ours[i][0], i) for i in range(0, len(ref), 50))
        for x, j in pairs:  # ToTensor's float pixels, every 50th image: the same floats, bit for bit
            torch.testing.assert_close(x, ref[j][0], rtol=0, atol=0)


def test_tabular_dataset_splits_features_and_integer_target():
    table = np.array([[0.5, 1.5, 2.0], [3.0, 4.0, 0.0], [5.0, 6.0, 1.0]])
    ds = TabularDataset(table)
    x, y = ds[0]
    assert len(ds) == 3 and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.tensor([0.5, 1.5]))
    assert y.item() == 2
    xb, yb = next(iter(DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 2) and yb.tolist() == [2, 0, 1]


@pytest.mark.parametrize("bad", [np.zeros(4), np.array([[1.0, 0.5]])])
def test_tabular_dataset_rejects_wrong_shapes_and_fractional_targets(bad):
    with pytest.raises(ValueError):
        TabularDataset(bad)


@pytest.mark.parametrize("meta, expected", [("{not json", "not valid transform metadata"),
                                            ('{"std": 0.3}', "not valid transform metadata")])
def test_corrupt_processed_metadata_is_a_one_line_error(processed_small, tmp_path, meta, expected):
    broken = tmp_path / "processed"
    shutil.copytree(processed_small, broken)
    (broken / "meta.json").write_text(meta)
    with pytest.raises(DataError, match=expected):
        load_processed(broken)


def test_truncated_array_is_a_one_line_error(processed_small, tmp_path):
    broken = tmp_path / "processed"
    shutil.copytree(processed_small, broken)
    (broken / "test_labels.npy").write_bytes(b"")
    with pytest.raises(DataError, match="test_labels.npy: not a valid .npy file"):
        load_processed(broken)
