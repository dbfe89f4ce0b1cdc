"""fmnist predict: pictures made from test images, in every format and look, classified as the pipeline does.

A small model is trained once (10,000 images from the mirror, 3 epochs: about 2 s); 50 test images
it classifies correctly (5 per class) are saved as PNG and JPEG, enlarged, made non-square,
inverted onto a light background, coloured and made transparent, and classified by the real
``fmnist`` command.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist import CLASSES, kernels, params
from fmnist import predict as pr
from fmnist.checkpoint import load_checkpoint, save_checkpoint
from fmnist.cli import main
from fmnist.data import Split, read_idx_pair
from fmnist.engine import predict, to_device, train_run
from fmnist.errors import DataError
from fmnist.tracking import RunManager

FMNIST = Path(sys.executable).parent / "fmnist"  # the console script pip installed beside this Python
CPU = torch.device("cpu")


def fmnist(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert FMNIST.is_file(), f"{FMNIST}: the fmnist command is not installed (pip install -e .)"
    return subprocess.run([str(FMNIST), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def trained(mirror, tmp_path_factory):
    """(checkpoint path, the test images uint8 [10000, 28, 28], their labels): a model trained in seconds."""
    train_x, train_y = read_idx_pair(mirror, "train")
    test_x, test_y = read_idx_pair(mirror, "test")
    n = 10_000
    pixels = train_x[:n].astype(np.float64) / 255
    mean, std = float(pixels.mean()), float(pixels.std())

    def split(lo: int, hi: int) -> Split:
        return Split(torch.from_numpy(train_x[lo:hi].copy()), torch.from_numpy(train_y[lo:hi].copy()))

    p = params.train_params({}, epochs=3, batch_size=100, cpu_kernel="fused" if kernels.available() else "torch")
    model, _ = train_run(p, to_device(split(0, n), mean, std, CPU), to_device(split(n, n + 1000), mean, std, CPU),
                         RunManager(stream=io.StringIO()))
    path = tmp_path_factory.mktemp("predict") / "model.pt"
    save_checkpoint(path, model, p, mean, std)
    return path, test_x, test_y


@pytest.fixture(scope="session")
def reference(trained):
    """Probabilities float [10000, 10] for the test images the evaluate stage's way: to_device, predict, softmax."""
    path, test_x, test_y = trained
    model, info = load_checkpoint(path, CPU, cpu_kernel="fused" if kernels.available() else "torch")
    x = to_device(Split(torch.from_numpy(test_x.copy()), torch.from_numpy(test_y.copy())),
                  info["normalize"]["mean"], info["normalize"]["std"], CPU).x
    return torch.softmax(predict(model, x), dim=1).numpy()


@pytest.fixture(scope="session")
def chosen(trained, reference):
    """Indices of 50 test images the model classifies correctly, 5 of each class."""
    _, _, test_y = trained
    right = np.flatnonzero(reference.argmax(1) == test_y)
    picked = np.concatenate([right[test_y[right] == c][:5] for c in range(len(CLASSES))])
    assert len(picked) == 50
    return picked


# Pictures made from a test image x (uint8 [28, 28], a light item on black)


def resized(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(x).resize(size, Image.Resampling.BICUBIC))


def padded(x: np.ndarray, size: tuple[int, int], value: int) -> np.ndarray:
    """``x`` centred on a ``size`` (width, height) canvas of ``value``."""
    (h, w), (width, height) = x.shape, size
    out = np.full((height, width), value, np.uint8)
    out[(height - h) // 2 : (height - h) // 2 + h, (width - w) // 2 : (width - w) // 2 + w] = x
    return out


def item_only(x: np.ndarray) -> np.ndarray:
    """The item's bounding box, enlarged 3x with its aspect ratio: a non-square picture without margins."""
    rows, cols = np.flatnonzero((x > 24).any(1)), np.flatnonzero((x > 24).any(0))
    box = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return resized(box, (3 * box.shape[1], 3 * box.shape[0]))


def coloured(x: np.ndarray, item: tuple, background: tuple) -> Image.Image:
    """An RGB picture: ``item`` colour where x is bright, ``background`` where it is dark."""
    a = (x.astype(np.float64) / 255)[..., None]
    rgb = np.asarray(background, float) * (1 - a) + np.asarray(item, float) * a
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def transparent(x: np.ndarray, item: tuple) -> Image.Image:
    """An RGBA picture: a red item, opaque where x is bright, on a fully transparent background."""
    rgba = np.zeros((*x.shape, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = item, x
    return Image.fromarray(rgba, "RGBA")


# name: (suffix, picture from x, whether its background is light, so that auto-invert must trigger)
VARIANTS = {
    "plain_png": ("png", lambda x: Image.fromarray(x), False),
    "plain_jpeg": ("jpg", lambda x: Image.fromarray(x), False),
    "enlarged_56x56": ("png", lambda x: Image.fromarray(resized(x, (56, 56))), False),
    "padded_90x60": ("jpg", lambda x: Image.fromarray(padded(resized(x, (60, 60)), (90, 60), 0)), False),
    "item_only_3x": ("png", lambda x: Image.fromarray(item_only(x)), False),
    "light_84x84": ("png", lambda x: Image.fromarray(255 - resized(x, (84, 84))), True),
    "light_padded_90x60": ("jpg", lambda x: Image.fromarray(padded(255 - resized(x, (60, 60)), (90, 60), 255)), True),
    "blue_on_cream": ("jpg", lambda x: coloured(resized(x, (112, 112)), (30, 60, 160), (250, 244, 232)), True),
    "orange_on_black": ("png", lambda x: coloured(resized(x, (70, 70)), (255, 160, 40), (12, 10, 20)), False),
    "transparent": ("png", lambda x: transparent(resized(x, (64, 64)), (200, 30, 30)), True),
}


@pytest.fixture(scope="session")
def pictures(trained, chosen, tmp_path_factory) -> Path:
    """A folder per variant holding the chosen test images as pictures, named by test index."""
    _, test_x, _ = trained
    root = tmp_path_factory.mktemp("pictures")
    for name, (suffix, make, _) in VARIANTS.items():
        (root / name).mkdir()
        for i in chosen:
            make(test_x[i]).save(root / name / f"{i:05d}.{suffix}")
    return root


@pytest.fixture(scope="session")
def cli_results(trained, pictures) -> dict[str, dict[int, dict]]:
    """``fmnist predict --json --top 10`` over every variant's folder in one call: variant -> test index -> record."""
    proc = fmnist("predict", "--json", "--top", "10", "--model", trained[0], *sorted(pictures.iterdir()))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    results: dict[str, dict[int, dict]] = {}
    for record in json.loads(proc.stdout):
        path = Path(record["file"])
        results.setdefault(path.parent.name, {})[int(path.stem)] = record
    return results


def run_main(argv: list, capsys) -> tuple[int, str, str]:
    """``fmnist ARGV`` in this process (torch is imported already): (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def probabilities_of(record: dict) -> np.ndarray:
    probs = np.zeros(len(CLASSES))
    for entry in record["top"]:
        assert entry["class"] == CLASSES[entry["index"]]
        probs[entry["index"]] = entry["probability"]
    return probs


def test_a_28x28_png_gives_exactly_the_pipelines_probabilities(cli_results, reference, chosen):
    records = cli_results["plain_png"]
    assert sorted(records) == sorted(chosen)
    for i, record in records.items():
        assert (record["width"], record["height"], record["inverted"]) == (28, 28, False)
        assert len(record["top"]) == 10
        np.testing.assert_allclose(probabilities_of(record), reference[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "plain_png"])
def test_a_transformed_picture_gets_the_originals_class(cli_results, reference, chosen, variant):
    records = cli_results[variant]
    assert sorted(records) == sorted(chosen)
    agree = [records[i]["top"][0]["index"] == reference[i].argmax() for i in chosen]
    assert sum(agree) >= 0.9 * len(chosen), f"{variant}: {sum(agree)} of {len(chosen)} agree"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auto_invert_triggers_on_light_backgrounds_only(cli_results, variant):
    light = VARIANTS[variant][2]
    assert {r["inverted"] for r in cli_results[variant].values()} == {light}


def test_the_picture_size_is_reported_as_read(cli_results, chosen):
    first = cli_results["padded_90x60"][chosen[0]]
    assert (first["width"], first["height"]) == (90, 60)


def test_invert_override_is_obeyed(trained, pictures, cli_results, capsys):
    light, dark = sorted((pictures / "light_84x84").iterdir())[:5], sorted((pictures / "plain_png").iterdir())[:5]
    kept = fmnist("predict", "--json", "--top", "10", "--invert", "no", "--model", trained[0], *light)
    kept = json.loads(kept.stdout)
    status, out, _ = run_main(["predict", "--json", "--invert", "yes", "--model", trained[0], *dark], capsys)
    forced = json.loads(out)
    assert status == 0
    assert [r["inverted"] for r in kept] == [False] * 5 and [r["inverted"] for r in forced] == [True] * 5
    for record, file in zip(kept, light, strict=True):  # a light picture left light is another input altogether
        auto = cli_results["light_84x84"][int(file.stem)]
        assert np.abs(probabilities_of(record) - probabilities_of(auto)).max() > 0.01


def test_text_output_is_one_line_per_picture_with_the_top_k_classes(trained, pictures, reference, chosen):
    files = sorted((pictures / "plain_png").iterdir())[:3] + sorted((pictures / "light_84x84").iterdir())[:1]
    proc = fmnist("predict", "--top", "2", "--model", trained[0], *files)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    for line, file in zip(lines[:3], files[:3], strict=True):  # 28x28 pictures: the pipeline's probabilities
        best, second = np.argsort(-reference[int(file.stem)])[:2]
        m = re.fullmatch(rf"{re.escape(str(file))}: (.+) (\d+\.\d)%, (.+) (\d+\.\d)%", line)
        assert m and (m[1], m[3]) == (CLASSES[best], CLASSES[second]), line
        shown = np.array([float(m[2]), float(m[4])])  # percentages to one decimal
        assert np.abs(shown - 100 * reference[int(file.stem)][[best, second]]).max() <= 0.0501
    assert lines[3].startswith(f"{files[3]} (inverted): ") and lines[3].count("%") == 2


def test_a_folder_stands_for_its_image_files_sorted_and_not_its_subfolders(trained, pictures, tmp_path, capsys):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    source = sorted((pictures / "plain_png").iterdir())
    for name, src in (("b.PNG", source[0]), ("a.png", source[1]), ("sub/c.png", source[2])):
        (folder / name).write_bytes(src.read_bytes())
    (folder / "notes.txt").write_text("not a picture\n")
    (folder / ".hidden.png").write_bytes(source[3].read_bytes())
    assert pr.expand(folder) == [folder / "a.png", folder / "b.PNG"]
    status, out, err = run_main(["predict", "--json", "--model", trained[0], folder], capsys)
    assert status == 0, err
    assert [Path(r["file"]).name for r in json.loads(out)] == ["a.png", "b.PNG"]


# Errors: one line per bad file naming it, the good pictures still classified, exit status 1


def test_bad_files_are_one_line_each_and_the_good_picture_is_still_classified(trained, pictures, tmp_path):
    good = sorted((pictures / "plain_png").iterdir())[0]
    missing, text, empty = tmp_path / "missing.png", tmp_path / "notes.txt", tmp_path / "empty"
    text.write_text("hello, I am not a picture\n")
    empty.mkdir()
    proc = fmnist("predict", "--model", trained[0], missing, good, text, empty)
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.startswith(f"{good}: ")
    errors = proc.stderr.splitlines()
    assert len(errors) == 3, proc.stderr
    assert errors[0] == f"error: {missing}: file not found"
    assert errors[1].startswith(f"error: {text}: not an image")
    assert errors[2].startswith(f"error: {empty}: no image files")
    assert "Traceback" not in proc.stderr


def test_a_truncated_picture_is_one_line_naming_it(trained, pictures, tmp_path):
    data = sorted((pictures / "enlarged_56x56").iterdir())[0].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"^{cut}: cannot read the image"):
        pr.read_picture(cut)


def test_a_missing_model_is_one_line_naming_it(pictures, tmp_path):
    good = sorted((pictures / "plain_png").iterdir())[0]
    proc = fmnist("predict", "--model", tmp_path / "nope.pt", good)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'nope.pt'}: checkpoint not found (run the train stage first)"]


def test_the_default_model_is_models_model_pt_in_the_current_folder(trained, pictures, tmp_path, monkeypatch,
                                                                    capsys):
    good = sorted((pictures / "plain_png").iterdir())[0]
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(["predict", good], capsys)
    assert status == 1 and out == ""
    assert err.startswith("error: models/model.pt: checkpoint not found")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(trained[0].read_bytes())
    assert run_main(["predict", good], capsys)[:2] == (0, run_main(["predict", "--model", trained[0], good], capsys)[1])


def test_a_file_that_is_not_a_checkpoint_is_one_line(pictures, tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not a checkpoint")
    status, out, err = run_main(["predict", "--model", fake, sorted((pictures / "plain_png").iterdir())[0]], capsys)
    assert status == 1 and out == ""
    assert err.splitlines() == [f"error: {fake}: not a readable checkpoint (UnpicklingError)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_one_line(trained, pictures, capsys):
    good = sorted((pictures / "plain_png").iterdir())[0]
    status, _, err = run_main(["predict", "--device", "cuda", "--model", trained[0], good], capsys)
    assert status == 1
    assert err.splitlines() == ["error: --device is 'cuda' but no CUDA GPU is available (use auto or cpu)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_classes_are_those_of_the_cpu(trained, pictures, chosen, reference):
    proc = fmnist("predict", "--json", "--device", "cuda", "--model", trained[0], pictures / "plain_png")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    agree = sum(r["top"][0]["index"] == reference[int(Path(r["file"]).stem)].argmax() for r in records)
    assert agree >= 0.98 * len(records)  # bfloat16 autocast on the GPU, as the evaluate stage


def test_help_shows_examples(capsys):
    status, out, _ = run_main(["predict", "--help"], capsys)
    assert status == 0
    assert "examples:\n  fmnist predict shoe.jpg" in out and "--invert {auto,yes,no}" in out
    assert "subfolders are not searched" in " ".join(out.split())


def test_a_bad_top_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--top", "11", str(tmp_path / "x.png")])
    assert info.value.code == 2


# Preparing a picture, in this process


def test_a_28x28_picture_is_kept_as_it_is_and_a_light_one_only_inverted(trained):
    x = trained[1][0]
    kept, inverted = pr.prepare(x)
    assert not inverted and np.array_equal(kept, x)
    back, inverted = pr.prepare(255 - x)
    assert inverted and np.array_equal(back, x)
    light, inverted = pr.prepare(255 - x, invert="no")
    assert not inverted and np.array_equal(light, 255 - x)
    forced, inverted = pr.prepare(x, invert="yes")
    assert inverted and np.array_equal(forced, 255 - x)


def test_the_background_is_judged_from_the_border():
    dark = np.zeros((40, 40), np.uint8)
    dark[5:35, 5:35] = 250  # a bright item well inside a black frame
    assert not pr.light_background(dark) and pr.light_background(255 - dark)
    touching = np.zeros((40, 40), np.uint8)
    touching[:, 10:30] = 250  # an item that touches two edges still leaves most of the border dark
    assert not pr.light_background(touching)


def test_a_non_square_item_keeps_its_aspect_ratio_and_is_centred():
    picture = np.zeros((100, 300), np.uint8)
    picture[20:80, 130:160] = 255  # a 30 wide, 60 tall item in a wide black picture
    out, inverted = pr.prepare(picture)
    assert out.shape == (28, 28) and not inverted
    lit = out > 127
    rows, cols = np.flatnonzero(lit.any(1)), np.flatnonzero(lit.any(0))
    assert (rows[0], rows[-1]) == (0, 27)  # cropped to the item: its height fills the square
    assert len(cols) == 14 and cols[0] == 7  # half as wide, centred
    uncropped, _ = pr.prepare(picture, crop=False)
    assert (uncropped > 127).sum() < lit.sum() / 4  # without cropping it is a sliver of a wide square


def test_padding_takes_the_backgrounds_value():
    grey = np.full((30, 60), 40, np.uint8)
    grey[10:20, 10:50] = 220
    square = pr.pad_square(grey, 40)
    assert square.shape == (60, 60) and (square[:15] == 40).all() and np.array_equal(square[15:45], grey)


def test_transparency_becomes_white_and_16_bit_pictures_keep_their_levels(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    gray = pr.to_gray(rgba)
    assert gray[0, 0] == 255 and gray[1, 1] == 0
    deep = np.array([[0, 32768], [65535, 257]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert pr.to_gray(Image.open(tmp_path / "deep.png")).tolist() == [[0, 128], [255, 1]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("L", (60, 20), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert pr.to_gray(Image.open(tmp_path / "phone.jpg")).shape == (60, 20)


def test_prepared_pictures_are_classified_as_the_command_does(trained, pictures, cli_results, chosen):
    model, info = pr.load_model(trained[0], CPU)
    files = [pictures / "blue_on_cream" / f"{i:05d}.jpg" for i in chosen[:10]]
    results = pr.classify(model, info, [pr.read_picture(f) for f in files], CPU)
    for r, i in zip(results, chosen[:10], strict=True):
        expected = probabilities_of(cli_results["blue_on_cream"][i])
        np.testing.assert_allclose(r.probabilities, expected, rtol=0, atol=1e-6)


def test_without_the_fused_kernel_pytorchs_layers_give_the_same_probabilities(trained, reference, chosen,
                                                                              monkeypatch):
    monkeypatch.setattr(kernels, "_state", kernels._Library(False, "not built (test)", "not built (test)"))
    model, info = pr.load_model(trained[0], CPU)  # builds with cpu_kernel="torch" instead of failing
    assert model.cpu_kernel == "torch"
    probs = pr.probabilities(model, info, trained[1][chosen], CPU)
    np.testing.assert_allclose(probs, reference[chosen], rtol=0, atol=1e-5)


# trains a tiny fastnet in bfloat16 with native numerics, in a fresh process as the train stage
# would, saves it and ten 28x28 test pictures, and prints the probabilities the evaluate stage's
# path gives them: in bfloat16 (with and without TTA) and, for contrast, in float32
BFLOAT16_RUN = """
import io, json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from fmnist import params, runtime
from fmnist.checkpoint import save_checkpoint
from fmnist.data import Split, read_idx_pair
from fmnist.engine import predict, to_device, train_run
from fmnist.tracking import RunManager

mirror, out = Path(sys.argv[1]), Path(sys.argv[2])
p = params.train_params({}, model="fastnet", width=4, epochs=1, numerics="native", precision="bfloat16", device="cpu")
runtime.configure(p)
train_x, train_y = read_idx_pair(mirror, "train")
test_x, _ = read_idx_pair(mirror, "test")
mean, std = float(train_x[:2000].mean() / 255), float(train_x[:2000].std() / 255)
split = lambda x, y: to_device(Split(torch.from_numpy(x.copy()), torch.from_numpy(y.copy())), mean, std,
                               torch.device("cpu"))
model, _ = train_run(p, split(train_x[:2000], train_y[:2000]), split(train_x[2000:2200], train_y[2000:2200]),
                     RunManager(stream=io.StringIO()))
save_checkpoint(out / "model.pt", model, p, mean, std)
for i in range(10):
    Image.fromarray(test_x[i]).save(out / f"{i}.png")
x = split(test_x[:10], np.zeros(10, dtype=np.int64)).x
probs = {f"{precision}{'_tta' if tta else ''}": torch.softmax(predict(model, x, tta=tta, precision=precision),
                                                               1).tolist()
         for precision, tta in (("bfloat16", False), ("bfloat16", True), ("float32", False))}
print(json.dumps(probs))
"""


def test_a_bfloat16_checkpoint_is_predicted_as_the_evaluate_stage_predicts_it(mirror, tmp_path):
    run = subprocess.run([sys.executable, "-c", BFLOAT16_RUN, str(mirror), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    expected = {k: np.array(v) for k, v in json.loads(run.stdout.splitlines()[-1]).items()}
    assert np.abs(expected["bfloat16"] - expected["float32"]).max() > 1e-4  # the precision shows in the figures
    assert np.abs(expected["bfloat16"] - expected["bfloat16_tta"]).max() > 1e-4  # and so does TTA
    files = [tmp_path / f"{i}.png" for i in range(10)]
    for flags, key in (([], "bfloat16"), (["--tta"], "bfloat16_tta")):
        proc = fmnist("predict", "--json", "--top", "10", "--device", "cpu", "--model", tmp_path / "model.pt",
                      *flags, *files)
        assert proc.returncode == 0, proc.stderr
        got = np.array([probabilities_of(r) for r in json.loads(proc.stdout)])
        np.testing.assert_allclose(got, expected[key], rtol=0, atol=1e-6)
