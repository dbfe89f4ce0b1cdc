"""fmnist serve: the API answers what `fmnist predict --json` prints, and hostile requests end in 4xx JSON.

The API's behaviour is tested in-process with FastAPI's TestClient; what a hostile client does to a
real server (a body that never ends, a picture that decodes to gigabytes) is tested against a running
`fmnist serve`, which must still answer afterwards, in bounded memory.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from urllib3 import encode_multipart_formdata

from fmnist import CLASSES, kernels, params
from fmnist import predict as pr
from fmnist.checkpoint import save_checkpoint
from fmnist.cli import main
from fmnist.models import build_model
from fmnist.serve import MAX_BODY, MAX_FILES, create_app

from .conftest import free_port

FMNIST = Path(sys.executable).parent / "fmnist"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained seed Network's checkpoint in a folder with a dvc.lock recording it, and evaluate's metrics."""
    repo = tmp_path_factory.mktemp("served")
    p = params.train_params({}, cpu_kernel="fused" if kernels.available() else "torch")
    path = repo / "models" / "model.pt"
    path.parent.mkdir()
    save_checkpoint(path, build_model("network", seed=3, cpu_kernel=p.cpu_kernel), p, 0.29, 0.35,
                    metrics={"val_accuracy": 0.5})
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    (repo / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  train:\n    outs:\n    - path: models/model.pt\n"
                                   f"      md5: {md5}\n      size: {path.stat().st_size}\n")
    (repo / "metrics").mkdir()
    (repo / "metrics" / "eval.json").write_text('{"test_accuracy": 0.125}')
    return path


@pytest.fixture(scope="session")
def client(checkpoint) -> TestClient:
    return TestClient(create_app(checkpoint, "cpu"))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> list[Path]:
    """Three pictures: a 28x28 one, a light-background JPEG to be inverted, a wide RGB PNG to be cropped."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("pictures")
    item = np.zeros((28, 28), np.uint8)
    item[6:22, 8:20] = rng.integers(120, 255, (16, 12), dtype=np.uint8)
    big = np.asarray(Image.fromarray(item).resize((84, 84)))
    wide = np.zeros((60, 200, 3), np.uint8)
    wide[10:50, 80:120] = (200, 120, 40)
    made = [("small.png", Image.fromarray(item)), ("light.jpg", Image.fromarray(255 - big)),
            ("wide.png", Image.fromarray(wide, "RGB"))]
    for name, img in made:
        img.save(folder / name)
    return [folder / name for name, _ in made]


def cli_json(capsys, paths: list[Path], model: Path, *options: str) -> list[dict]:
    """What `fmnist predict --json` prints (its main, in this process: the console script calls only that)."""
    capsys.readouterr()
    assert main(["predict", *map(str, paths), "--model", str(model), "--device", "cpu", "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_answers_what_fmnist_predict_json_prints_with_the_picture_the_model_saw(client, checkpoint, pictures,
                                                                                        capsys):
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in pictures]
    answer = client.post("/predict?top=4&invert=auto", files=files)
    assert answer.status_code == 200, answer.text
    records = answer.json()
    expected = cli_json(capsys, pictures, checkpoint, "--top", "4")
    for record, cli in zip(records, expected, strict=True):
        seen = Image.open(io.BytesIO(base64.b64decode(record.pop("picture").removeprefix("data:image/png;base64,"))))
        assert (seen.size, seen.mode) == ((28, 28), "L")
        assert record == cli | {"file": Path(cli["file"]).name}  # the client's file name, not a server path
    assert [r["inverted"] for r in records] == [False, True, False]
    assert [len(r["top"]) for r in records] == [4, 4, 4]


def test_a_raw_body_is_one_picture_and_the_options_are_fmnist_predicts(client, checkpoint, pictures, capsys):
    light = pictures[1]
    answer = client.post("/predict?top=10&invert=no&crop=false&tta=true", content=light.read_bytes(),
                         headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200, answer.text
    (record,) = answer.json()
    (cli,) = cli_json(capsys, [light], checkpoint, "--top", "10", "--invert", "no", "--no-crop", "--tta")
    assert record["top"] == cli["top"] and record["file"] == "upload" and not record["inverted"]
    assert sorted(g["class"] for g in record["top"]) == sorted(CLASSES)


def test_model_describes_the_checkpoint_with_the_evaluate_stages_metrics_when_dvc_lock_records_it(
    client, checkpoint, tmp_path,
):
    described = client.get("/model").json()
    assert described["model"] == "network" and described["params"]["lr"] == params.train_params({}).lr
    assert described["checkpoint"]["md5"] == described["checkpoint"]["dvc_lock_md5"]
    assert described["metrics"] == {"train": {"val_accuracy": 0.5}, "eval": {"test_accuracy": 0.125}}
    moved = tmp_path / "model.pt"  # outside the repository: nothing says evaluate's figures are its own
    moved.write_bytes(checkpoint.read_bytes())
    elsewhere = TestClient(create_app(moved, "cpu")).get("/model").json()
    assert elsewhere["checkpoint"]["dvc_lock_md5"] is None and elsewhere["metrics"]["eval"] is None


def test_healthz_the_page_and_the_openapi_schema(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "<script src" not in page.text  # no build step, nothing fetched
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    assert {"top", "invert", "crop", "tta"} == {p["name"] for p in schema["paths"]["/predict"]["post"]["parameters"]}


def bomb_png(side: int, bits: int = 8) -> bytes:
    """A valid grey PNG ``side`` x ``side`` of zeros: tiny on disk, ``side**2`` pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side * bits + 7) // 8)  # filter byte, then the row's pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, bits, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("body", "content_type", "status", "says"), [
    (b"%PDF-1.4 not a picture", "application/octet-stream", 422, "not an image"),
    (png(np.full((64, 64), 200, np.uint8))[:-40], "image/png", 422, "cannot read the image"),
    (b"", "image/png", 422, "not an image"),
    (b"{}", "application/json", 415, "cannot take application/json"),
    (b"x", "", 415, "without a Content-Type"),
    (b"a=1", "multipart/form-data", 400, "Missing boundary"),
    (b"--x\r\nbad header\r\n\r\n1\r\n--x--\r\n", "multipart/form-data; boundary=x", 400, "Invalid multipart"),
    (b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--x--\r\n", "multipart/form-data; boundary=x",
     422, "no files"),
], ids=["not-a-picture", "truncated-png", "empty", "json", "no-content-type", "no-boundary", "broken-form",
     "form-without-files"])
def test_a_bad_request_is_a_4xx_json_error_naming_the_problem(server, body, content_type, status, says):
    answered, answer, _ = exchange(server, post(body, content_type))
    assert answered == status and says in answer["detail"], answer


def test_too_many_files_is_refused_before_any_is_classified(server, pictures):
    small = pictures[0].read_bytes()
    answers = {}
    for count in (MAX_FILES + 1, MAX_FILES):
        body, kind = encode_multipart_formdata([("file", (f"{i}.png", small, "image/png")) for i in range(count)])
        answers[count] = exchange(server, post(body, kind))
    status, answer, _ = answers[MAX_FILES + 1]
    assert status == 400 and f"Maximum number of files is {MAX_FILES}" in answer["detail"]
    status, answer, _ = answers[MAX_FILES]
    assert status == 200 and [a["file"] for a in answer] == [f"{i}.png" for i in range(MAX_FILES)]


def test_bad_query_parameters_are_422(client, pictures):
    for query in ("top=0", "top=11", "invert=maybe", "crop=perhaps"):
        answer = client.post(f"/predict?{query}", content=pictures[0].read_bytes(), headers={"content-type": "image/png"})
        assert answer.status_code == 422, query


# Against a running `fmnist serve`


def start_server(checkpoint: Path, *options: str) -> tuple[str, int, subprocess.Popen]:
    """(host, port, the server's process): `fmnist serve` on a free port, once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen([str(FMNIST), "serve", "--model", str(checkpoint), "--port", str(port), "--device", "cpu",
                             *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(("127.0.0.1", port, proc))
    return "127.0.0.1", port, proc


@pytest.fixture(scope="module")
def server(checkpoint):
    """A running `fmnist serve` (:func:`start_server`) with a short body timeout."""
    host, port, proc = start_server(checkpoint, "--body-timeout", "2")
    yield host, port, proc
    proc.terminate()  # as `kill` or a service manager stops it: uvicorn shuts down, then one line and 143
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143 and out.strip().splitlines()[-1] == "interrupted (SIGTERM)", out
    assert "Application shutdown complete" in out and "Traceback" not in out, out


def wait_for(server) -> None:
    """Until ``server`` (host, port, process) accepts connections; its output if it exits first."""
    host, port, proc = server
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
    raise AssertionError(f"{host}:{port}: no server after 90 s")


def exchange(server, request: bytes, pause_after: int | None = None, trickle: float = 0) -> tuple[int, dict, float]:
    """Send ``request`` raw (``trickle`` seconds between its last bytes, one at a time, from ``pause_after`` on)
    and read the answer: (status, JSON body, seconds taken)."""
    host, port, _ = server
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as s:
        head, tail = (request, b"") if pause_after is None else (request[:pause_after], request[pause_after:])
        s.sendall(head)
        try:
            for byte in tail:
                time.sleep(trickle)
                s.sendall(bytes([byte]))
        except OSError:  # the server has answered and closed: read what it said
            pass
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                head_end = answer.index(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", answer[:head_end].lower()).group(1))
                if len(answer) >= head_end + 4 + length:
                    break
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer[answer.index(b"\r\n\r\n") + 4:]), time.monotonic() - started


def post(body: bytes, content_type: str = "image/png", length: int | None = None) -> bytes:
    """A raw POST /predict request (no Content-Type header for an empty ``content_type``)."""
    kind = f"Content-Type: {content_type}\r\n" if content_type else ""
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\n{kind}Connection: close\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def test_pixel_bombs_are_refused_on_their_header_in_bounded_memory(server):
    before = rss_mib(server[2].pid)
    for side, bits, says in ((30_000, 1, "too large to read safely"), (12_000, 8, "at most 64 million")):
        body = bomb_png(side, bits)
        assert len(body) < 200_000  # 900 and 144 million pixels
        status, answer, _ = exchange(server, post(body))
        assert status == 422 and says in answer["detail"], answer
    assert rss_mib(server[2].pid) - before < 100


def test_an_oversized_body_is_413_whether_announced_or_sent(server):
    status, answer, _ = exchange(server, post(b"", length=MAX_BODY + 1))  # refused on the header: nothing sent
    assert status == 413 and "MiB" in answer["detail"]
    chunked = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n")
    piece = b"\0" * 2**20
    chunked += (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * (MAX_BODY // len(piece) + 1) + b"0\r\n\r\n"
    status, answer, _ = exchange(server, chunked)
    assert status == 413


def test_a_trickled_body_is_cut_off_at_the_body_timeout(server, pictures):
    request = post(pictures[0].read_bytes())
    status, answer, took = exchange(server, request, pause_after=len(request) - 20, trickle=0.5)  # 10 s in all
    assert status == 408 and "did not arrive within 2 s" in answer["detail"] and took < 6


def test_the_server_still_answers_after_hostile_requests(server, pictures):
    status, answer, _ = exchange(server, post(pictures[0].read_bytes()))
    assert status == 200 and len(answer) == 1 and answer[0]["file"] == "upload"


def test_serve_without_a_model_is_one_line_and_its_help_has_examples(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--model", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and err.count("\n") == 1 and "none.pt" in err, err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "curl -F file=@shoe.jpg" in capsys.readouterr().out


# The page, in a real browser: the system's Chromium driven by Playwright


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args, chromium):
    """pytest-playwright's launch options, for the system's Chromium (Playwright's own builds are downloads)."""
    return {**browser_type_launch_args, "executable_path": chromium,
            "args": ["--disable-background-networking", "--disable-component-update", "--disable-sync"]}


def test_the_page_classifies_chosen_pictures_by_keyboard_offline_and_fits_a_phone(server, page, pictures, client,
                                                                                    tmp_path):
    from playwright.sync_api import expect

    host, port, _ = server
    base = f"http://{host}:{port}/"
    elsewhere = []
    page.on("request", lambda r: None if r.url.startswith(base) or r.url.startswith(("data:", "blob:"))
            else elsewhere.append(r.url))
    page.set_viewport_size({"width": 390, "height": 844})  # a phone's screen
    page.goto(base)
    expect(page.locator("#model")).to_contain_text("Model: network, test accuracy 12.5%")
    page.keyboard.press("Tab")  # the first stop is the file chooser: keyboard users reach it at once
    assert page.evaluate("document.activeElement.id") == "files"

    page.set_input_files("#files", [str(p) for p in pictures])
    cards = page.locator("#results li")
    expect(cards).to_have_count(len(pictures))
    api = client.post("/predict", files=[("file", (p.name, p.read_bytes(), "image/png")) for p in pictures]).json()
    for card, record in zip(cards.all(), api, strict=True):
        expect(card.locator(".name")).to_have_text(record["file"] + (" (inverted)" if record["inverted"] else ""))
        expect(card.locator(".class")).to_have_text([g["class"] for g in record["top"]])
        seen = card.locator("img.seen")
        assert seen.get_attribute("src") == record["picture"]
        assert seen.evaluate("img => img.complete && img.naturalWidth") == 28
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    page.screenshot(path=tmp_path / "page.png", full_page=True)

    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    page.set_input_files("#files", str(text))
    expect(page.locator("#error")).to_contain_text("notes.txt: not an image")
    expect(cards).to_have_count(len(pictures))  # the last results stay
    assert elsewhere == []


def test_two_workers_answer_as_one_does(checkpoint, pictures, server):
    two = start_server(checkpoint, "--workers", "2")
    proc = two[2]
    try:
        request = post(pictures[2].read_bytes())
        answers = {json.dumps(exchange(two, request)[1]) for _ in range(6)}
        assert answers == {json.dumps(exchange(server, request)[1])}
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out


def test_a_photo_sized_jpeg_is_decoded_reduced_and_reported_at_its_size(server):
    photo = np.full((3024, 4032, 3), 235, np.uint8)
    photo[600:2400, 1500:2600] = (40, 60, 150)  # a dark item on a light background
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    with Image.open(io.BytesIO(buffer.getvalue())) as img:
        pr.open_scaled(img)
        assert img.size == (2016, 1512)  # half scale: the shorter side stays over DRAFT_SIDE
    status, answer, _ = exchange(server, post(buffer.getvalue(), "image/jpeg"))
    assert status == 200 and (answer[0]["width"], answer[0]["height"], answer[0]["inverted"]) == (4032, 3024, True)
